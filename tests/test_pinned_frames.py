"""dycoke.pinned_frames: a process's first read goes to ordinary memory and has a block made for the
next; a block is lent to one frames array at a time and comes back when the array is gone; at most
``max_blocks``, a free one too small replaced; a refused block stops the tries; chosen for a GPU only;
on a GPU the very frames and answers of a plain read."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from dycoke.config import ModelOptions
from dycoke.pinned_frames import PINNED_FRAMES_ENV, BlockPool, PinnedFrames, pinned_frames
from dycoke.pipeline import VideoQA
from dycoke.reading import decode_video

CLIP = Path(__file__).resolve().parents[1] / "samples" / "bigbuckbunny.mp4"
SHAPE = (4, 8, 10, 3)  # 960 bytes


class Recording:
    """Ordinary memory standing in for page-locked blocks, each request recorded."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        self.made.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)


def in_block(frames: np.ndarray, pool: BlockPool) -> bool:
    return any(np.shares_memory(frames, block.numpy()) for block in pool.blocks)


def test_the_first_read_is_ordinary_and_has_a_block_made_for_the_next() -> None:
    make = Recording()
    pool = BlockPool(make)
    first = pool.frames(SHAPE)
    pool.wait()
    assert not in_block(first, pool) and make.made == [960] and len(pool.blocks) == 1
    second = pool.frames(SHAPE)
    assert in_block(second, pool) and second.shape == SHAPE and second.dtype == np.uint8
    second[:] = 7  # writable, and the block holds it
    assert int(pool.blocks[0][:960].sum()) == 7 * 960


def test_a_block_is_lent_to_one_array_at_a_time_and_comes_back() -> None:
    make = Recording()
    pool = BlockPool(make, max_blocks=1)
    pool.frames(SHAPE)
    pool.wait()
    lent = pool.frames(SHAPE)
    view = lent[1:3]
    other = pool.frames(SHAPE)  # the block is in use: ordinary memory, and no new block (pool full)
    pool.wait()
    assert in_block(lent, pool) and not in_block(other, pool) and make.made == [960]
    del lent
    gc.collect()
    assert pool.lent  # a view keeps the array, and so the block, in use
    del view
    gc.collect()
    assert not pool.lent and in_block(pool.frames(SHAPE), pool)


def test_a_smaller_read_borrows_a_larger_block() -> None:
    pool = BlockPool(Recording())
    pool.frames(SHAPE)
    pool.wait()
    small = pool.frames((2, 8, 10, 3))
    assert in_block(small, pool) and small.shape == (2, 8, 10, 3)


def test_a_larger_read_gets_a_second_block_then_replaces_the_smaller_free_one() -> None:
    make = Recording()
    pool = BlockPool(make, max_blocks=2)
    pool.frames(SHAPE)
    pool.wait()
    kept = pool.frames(SHAPE)  # the first block, in use
    pool.frames((8, 8, 10, 3))  # none free and large enough: ordinary memory, a second block made
    pool.wait()
    assert sorted(b.numel() for b in pool.blocks) == [960, 1920]
    del kept
    gc.collect()
    pool.frames((16, 8, 10, 3))  # both free, both too small: the smaller one is replaced
    pool.wait()
    assert sorted(b.numel() for b in pool.blocks) == [1920, 3840] and make.made == [960, 1920, 3840]


def test_a_refused_block_stops_the_tries() -> None:
    calls = []

    def refuse(nbytes: int) -> torch.Tensor:
        calls.append(nbytes)
        raise RuntimeError("CUDA error: out of memory")

    pool = BlockPool(refuse)
    for _ in range(3):
        frames = pool.frames(SHAPE)
        pool.wait()
        assert isinstance(frames, np.ndarray) and frames.shape == SHAPE
    assert calls == [960] and pool.refused and not pool.blocks


def test_pinned_frames_only_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pinned_frames(torch.device("cpu")) is None
    assert isinstance(pinned_frames(torch.device("cuda")), PinnedFrames)
    monkeypatch.setenv(PINNED_FRAMES_ENV, "0")
    assert pinned_frames(torch.device("cuda")) is None


def test_a_read_into_a_block_returns_the_frames_of_a_plain_read() -> None:
    pool = BlockPool(Recording())
    plain = decode_video(CLIP).frames
    decode_video(CLIP, sink=PinnedFrames(pool))  # makes the block
    pool.wait()
    sunk = decode_video(CLIP, sink=PinnedFrames(pool)).frames
    assert in_block(sunk.frames, pool)
    assert sunk.indices == plain.indices and np.array_equal(sunk.frames, plain.frames)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_later_reads_land_in_page_locked_memory(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dycoke.pinned_frames as module

    monkeypatch.setattr(module, "_POOL", BlockPool())
    gpu = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda", dtype="float32"))
    assert not torch.from_numpy(gpu.read(CLIP).frames.frames).is_pinned()  # the first read: ordinary
    module._POOL.wait()
    prepared = gpu.prepare(CLIP)
    assert torch.from_numpy(prepared.frames.frames).is_pinned()
    del prepared
    answers = {}
    for pinned in ("1", "0"):
        monkeypatch.setenv(PINNED_FRAMES_ENV, pinned)
        answers[pinned] = gpu.ask(CLIP, "What is here?", num_frames=24, max_new_tokens=8).token_ids
    assert answers["1"] == answers["0"]
