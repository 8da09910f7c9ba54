"""``dycoke.warmup`` off CUDA (the GPU checks are in ``tests/test_gpu.py``)."""

from __future__ import annotations

import torch

from dycoke.warmup import start_warming


def test_nothing_is_warmed_off_cuda() -> None:
    assert start_warming(torch.device("cpu"), torch.float32) is None
