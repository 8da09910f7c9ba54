"""A process's start before its model load: the heavy imports, with the checkpoint's weights read meanwhile.

Imports nothing heavy itself (``dycoke ask`` and ``dycoke serve`` call it before ``import torch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dycoke.config import ModelOptions
from dycoke.heap import imports_without_collection

if TYPE_CHECKING:
    from dycoke.weights import WeightPrefetch


def import_while_reading_weights(
    options: ModelOptions, check: Callable[[], None] | None = None
) -> WeightPrefetch | None:
    """Import torch and the model code without garbage collection (``dycoke.heap``) while a thread reads
    ``options``' weights onto the GPU where that fits (``dycoke.weights``: it also initialises CUDA and
    starts the decode kernels' compile, so this thread goes straight on to the imports); without such a
    read, CUDA is initialised here, before transformers imports. ``check`` runs once torch is imported,
    before the read starts (a video error fails first). Returns the read, for ``VideoQA.load(options,
    weights=...)``, or None (the plain load)."""
    with imports_without_collection():
        import torch

        from dycoke.weights import prefetch_weights

        if check is not None:
            check()
        weights = prefetch_weights(options)
        if weights is None and options.device not in ("cpu", "mps") and torch.cuda.is_available():
            torch.cuda.init()
        import dycoke.pipeline  # noqa: F401 (transformers' model code, during the read)
    return weights
