"""Python's garbage collector around a process's start: what torch and transformers leave on the heap.

Importing torch and transformers' model code leaves about 360k long-lived objects. Every full
collection scans them all (0.3 s each on the 2-core machine), during the import (six of them) and
again at interpreter exit. ``imports_without_collection`` turns collection off for the imports and
then freezes what exists (``gc.freeze``: later collections, the one at exit included, skip it). On
the 2-core machine a fresh ``dycoke ask`` on the tiny checkpoint went from 6.7-7.3 s to 5.0-5.7 s:
about 0.6 s less start-up and 1 s less exit. This module imports nothing heavy (the CLI uses it before
``import torch``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from dycoke.switches import switch


@contextmanager
def imports_without_collection() -> Iterator[None]:
    """No collection inside the block; on leaving it, every object so far frozen and collection back on.

    For a block of imports: they make almost no cyclic garbage and none that holds tensors, so
    nothing is kept that a collection would have freed. Code that allocates tensors (the model load,
    an answer) runs outside it, with collection on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


FREEZE_ENV = "DYCOKE_FREEZE_HEAP"
"""``DYCOKE_FREEZE_HEAP=0``: ``VideoQA.load`` leaves Python's garbage collector as it is."""


def freeze_after_start() -> None:
    """Collect once, then freeze everything a long-running process (the server) built while starting,
    so that no request pays for a full collection over the model's and the libraries' objects."""
    gc.collect()
    gc.freeze()


def freeze_after_load() -> None:
    """``freeze_after_start`` once a model has loaded (``VideoQA.load``), unless ``DYCOKE_FREEZE_HEAP=0``.

    In a process that imported torch and transformers itself (a library user's), a full collection
    scans their few hundred thousand objects: on the H200 machine one came during the first answer of
    each such process and took 0.21 s of its 0.9-1.1 s (``benchmarks/bench_cold.py``'s in-process
    answers, ``gc_s``). Collected and frozen here, every later collection skips them. Objects alive at
    that moment are never collected afterwards, even once unreachable (``gc.unfreeze()`` undoes it)."""
    if switch(FREEZE_ENV, default=True):
        freeze_after_start()
