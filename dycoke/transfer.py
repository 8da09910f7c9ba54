"""Moving host tensors to the model's device without stalling the host, and waiting for the device
(torch only).

A copy from pageable host memory to a GPU waits for all the work queued on the device before it, so a
caller that queues GPU work ahead of the GPU (``dycoke.stream_encode``, ``dycoke.stream_prefill``)
would stall at every small copy. Through pinned memory (torch's caching host allocator) the copy is
queued like any kernel.

Decoded frames are the largest host tensor a run moves (128 frames of 720p: 354 MB). From pageable
memory that upload took 50.6 ms on the H200 machine, from pinned memory 6.5 ms
(``benchmarks/results/preprocess-breakdown-h200.txt``), so a reader in the model's process writes the
frames straight into pinned memory (``pinned_frames``).
"""

from __future__ import annotations

import numpy as np
import torch

from dycoke.switches import switch

PINNED_FRAMES_ENV = "DYCOKE_PINNED_FRAMES"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` on ``device``: on a GPU through pinned memory, queued without waiting for the
    device's earlier work; elsewhere as ``tensor.to(device)``."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU; nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PinnedFrames:
    """Where a read puts its frames (a ``dycoke.video.readers.FrameSink``): an array in page-locked host
    memory from torch's caching host allocator, which keeps the block for the next read once the
    array is gone (the allocator rounds a block up to a power of two: 512 MiB for 128 frames of 720p).
    Falls back to ordinary memory when page-locked memory is refused."""

    in_order = False

    def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """(F, H, W, 3) uint8, page-locked when it can be (the array keeps its torch storage alive)."""
        try:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=True).numpy()
        except RuntimeError:  # out of page-locked memory, or no usable driver after all
            return np.empty(shape, dtype=np.uint8)

    def landed(self, slots: list[int]) -> None:
        """Nobody waits for single frames."""


def pinned_frames(device: torch.device) -> PinnedFrames | None:
    """The sink a read for a model on ``device`` should use: ``PinnedFrames`` for a GPU, unless
    ``DYCOKE_PINNED_FRAMES=0``; None (ordinary memory) elsewhere."""
    if device.type != "cuda" or not switch(PINNED_FRAMES_ENV, True):
        return None
    return PinnedFrames()
