"""Compression methods, one module each (its class and its attention glue); ``base`` holds the
protocol the pipeline drives and the registry: ``build_method`` builds a method by name."""

from dycoke.methods.base import (
    Compaction,
    CompressedVisual,
    CompressionMethod,
    VisionSignals,
    build_method,
    registered_methods,
)

__all__ = [
    "Compaction",
    "CompressedVisual",
    "CompressionMethod",
    "VisionSignals",
    "build_method",
    "registered_methods",
]
