"""Moving host tensors to the model's device without stalling the host, and waiting for the device
(torch only).

A copy from pageable host memory to a GPU waits for all the work queued on the device before it, so a
caller that queues GPU work ahead of the GPU (``dycoke.stream_encode``, ``dycoke.stream_prefill``)
would stall at every small copy. Through pinned memory (torch's caching host allocator) the copy is
queued like any kernel. Decoded frames, the largest host tensor a run moves, are read straight into
page-locked memory instead (``dycoke.pinned_frames``).
"""

from __future__ import annotations

import torch


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
