"""dycoke.transfer's frames in page-locked memory: chosen for a GPU only, switchable off, a plain array
where page-locked memory is refused, and on a GPU the very frames a plain read returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dycoke.config import ModelOptions
from dycoke.pipeline import VideoQA
from dycoke.reading import decode_video
from dycoke.transfer import PINNED_FRAMES_ENV, PinnedFrames, pinned_frames

CLIP = Path(__file__).resolve().parents[1] / "samples" / "bigbuckbunny.mp4"


def test_pinned_frames_only_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pinned_frames(torch.device("cpu")) is None
    assert isinstance(pinned_frames(torch.device("cuda")), PinnedFrames)
    monkeypatch.setenv(PINNED_FRAMES_ENV, "0")
    assert pinned_frames(torch.device("cuda")) is None


def test_refused_page_locked_memory_gives_a_plain_array(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "empty", refuse)
    frames = PinnedFrames().allocate((2, 4, 6, 3))
    assert isinstance(frames, np.ndarray) and frames.shape == (2, 4, 6, 3) and frames.dtype == np.uint8


def test_a_read_into_the_sink_returns_the_frames_of_a_plain_read() -> None:
    plain = decode_video(CLIP).frames
    sunk = decode_video(CLIP, sink=PinnedFrames()).frames
    assert sunk.indices == plain.indices and np.array_equal(sunk.frames, plain.frames)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_prepare_reads_into_page_locked_memory(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = PinnedFrames().allocate((2, 4, 6, 3))
    assert torch.from_numpy(frames).is_pinned()
    gpu = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda", dtype="float32"))
    prepared = gpu.prepare(CLIP)
    assert torch.from_numpy(prepared.frames.frames).is_pinned()
    answers = {}
    for pinned in ("1", "0"):
        monkeypatch.setenv(PINNED_FRAMES_ENV, pinned)
        answers[pinned] = gpu.ask(CLIP, "What is here?", num_frames=24, max_new_tokens=8).token_ids
    assert answers["1"] == answers["0"]
