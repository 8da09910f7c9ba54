"""Attention whose shape changes per question (prefill, vision encoder, ``generate``) runs without cuDNN
attention, whose per-shape plans cost up to a second at each new length on Hopper; the decode step
keeps torch's choice. torch's flag is process-wide, so the block's bookkeeping is checked across
threads too."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.config import ModelOptions
from dycoke.pipeline import VideoQA
from dycoke.sdpa_choice import CUDNN_PREFILL_ENV, without_cudnn_attention
from tests.videos import textured_frames, write_video


@pytest.fixture
def cudnn_on() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_the_block_turns_cudnn_attention_off_and_restores_it(cudnn_on: None) -> None:
    with without_cudnn_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        with without_cudnn_attention():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_a_flag_turned_off_by_the_user_stays_off() -> None:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        with without_cudnn_attention():
            pass
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_overlapping_blocks_on_two_threads_restore_the_flag_once_both_end(cudnn_on: None) -> None:
    """A then B enter, A leaves first: the flag stays off until B leaves, then it is on again (a plain
    save-and-restore per block would leave it off for good)."""
    a_inside, b_inside, a_left = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with without_cudnn_attention():
            a_inside.set()
            b_inside.wait(5)
        a_left.set()

    def second() -> None:
        a_inside.wait(5)
        with without_cudnn_attention():
            b_inside.set()
            a_left.wait(5)
            seen["after A left, inside B"] = torch.backends.cuda.cudnn_sdp_enabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after A left, inside B": False}
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_the_environment_variable_leaves_the_choice_to_torch(cudnn_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUDNN_PREFILL_ENV, "1")
    with without_cudnn_attention():
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("decoder", ["static", "hf"])
def test_prefill_and_vision_encoder_run_without_cudnn_and_decode_steps_with_it(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cudnn_on: None, decoder: str
) -> None:
    """Every SDPA call of one answer, by its query length: the vision tower's and the prefill's (many
    queries) see cuDNN off; the static decoder's one-query steps see torch's own choice (on)."""
    calls: list[tuple[int, bool]] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((int(query.shape[-2]), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, *args, **kwargs)

    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))
    clip = write_video(tmp_path / "c.mp4", textured_frames(8, 64, 96, seed=3), fps=4)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    qa.ask(clip, "What moves?", num_frames=4, max_new_tokens=4, min_new_tokens=4, decoder=decoder)
    many = [cudnn for length, cudnn in calls if length > 1]
    one = [cudnn for length, cudnn in calls if length == 1]
    assert many and not any(many)
    assert one
    assert all(one) if decoder == "static" else not any(one)  # generate's steps change length each time
    assert torch.backends.cuda.cudnn_sdp_enabled()
