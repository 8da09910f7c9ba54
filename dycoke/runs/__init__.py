"""Runs of many questions on top of the pipeline: ``batch`` (a questions CSV), ``results`` (the durable,
resumable output file), ``parallel`` (data-parallel processes), ``compare`` (several methods on the
same frames)."""
