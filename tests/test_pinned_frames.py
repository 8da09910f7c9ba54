"""dycoke.pinned_frames: a read gets a block of its own size, lent to one frames array at a time and
back when the array and its views are gone; at most ``max_blocks``, a free one too small replaced,
ordinary memory when all are in use or locking is refused; the fault-in touches every page; chosen for
a GPU only; on a GPU page-locked frames, and the very frames and answers of a plain read."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

from dycoke.config import ModelOptions
from dycoke.pinned_frames import PINNED_FRAMES_ENV, BlockPool, PinnedFrames, _fault_in, lock_block, pinned_frames
from dycoke.pipeline import VideoQA
from dycoke.reading import decode_video

CLIP = Path(__file__).resolve().parents[1] / "samples" / "bigbuckbunny.mp4"
SHAPE = (4, 8, 10, 3)  # 960 bytes


class Recording:
    """Ordinary memory standing in for page-locked blocks, each request recorded."""

    def __init__(self) -> None:
        self.made: list[int] = []

    def __call__(self, nbytes: int) -> np.ndarray:
        self.made.append(nbytes)
        return np.empty(nbytes, dtype=np.uint8)


def in_block(frames: np.ndarray, pool: BlockPool) -> bool:
    return any(np.shares_memory(frames, block) for block in pool.blocks)


def test_a_read_gets_a_block_of_its_size_and_the_next_reuses_it() -> None:
    make = Recording()
    pool = BlockPool(make)
    first = pool.frames(SHAPE)
    assert in_block(first, pool) and first.shape == SHAPE and first.dtype == np.uint8 and make.made == [960]
    first[:] = 7  # writable, and the block holds it
    assert int(pool.blocks[0].sum()) == 7 * 960
    del first
    gc.collect()
    assert in_block(pool.frames(SHAPE), pool) and make.made == [960]


def test_a_block_is_lent_to_one_array_at_a_time_and_comes_back() -> None:
    make = Recording()
    pool = BlockPool(make, max_blocks=1)
    lent = pool.frames(SHAPE)
    view = lent[1:3]
    other = pool.frames(SHAPE)  # the block is in use and the pool full: ordinary memory
    assert in_block(lent, pool) and not in_block(other, pool) and make.made == [960]
    del lent
    gc.collect()
    assert pool.lent  # a view keeps the array, and so the block, in use
    del view
    gc.collect()
    assert not pool.lent and in_block(pool.frames(SHAPE), pool)


def test_a_smaller_read_borrows_a_larger_block() -> None:
    make = Recording()
    pool = BlockPool(make)
    first = pool.frames(SHAPE)
    del first
    gc.collect()
    small = pool.frames((2, 8, 10, 3))
    assert in_block(small, pool) and small.shape == (2, 8, 10, 3) and make.made == [960]


def test_a_larger_read_gets_a_second_block_then_replaces_the_smaller_free_one() -> None:
    make = Recording()
    pool = BlockPool(make, max_blocks=2)
    kept = pool.frames(SHAPE)
    larger = pool.frames((8, 8, 10, 3))  # the first block in use: a second one
    assert sorted(b.nbytes for b in pool.blocks) == [960, 1920]
    del kept, larger
    gc.collect()
    pool.frames((16, 8, 10, 3))  # both free, both too small: the smaller one is replaced
    assert sorted(b.nbytes for b in pool.blocks) == [1920, 3840] and make.made == [960, 1920, 3840]


def test_the_smaller_free_block_is_replaced_wherever_it_is_in_the_pool() -> None:
    make = Recording()
    pool = BlockPool(make, max_blocks=2)
    large = pool.frames((8, 8, 10, 3))
    small = pool.frames(SHAPE)  # the second block, the smaller
    del large, small
    gc.collect()
    pool.frames((16, 8, 10, 3))
    assert [b.nbytes for b in pool.blocks] == [1920, 3840]


def test_a_refused_block_stops_the_tries() -> None:
    calls = []

    def refuse(nbytes: int) -> np.ndarray:
        calls.append(nbytes)
        raise RuntimeError("cudaHostRegister of 960 bytes failed")

    pool = BlockPool(refuse)
    for _ in range(3):
        frames = pool.frames(SHAPE)
        assert isinstance(frames, np.ndarray) and frames.shape == SHAPE
    assert calls == [960] and pool.refused and not pool.blocks


def test_the_fault_in_writes_every_page() -> None:
    block = np.full(10 * 4096 + 100, 1, dtype=np.uint8)
    _fault_in(block)
    assert (block.reshape(-1)[: 10 * 4096].reshape(10, 4096)[:, 0] == 0).all() and block[10 * 4096] == 0
    assert int((block == 0).sum()) == 11  # one byte per page, nothing else


def test_pinned_frames_only_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pinned_frames(torch.device("cpu")) is None
    assert isinstance(pinned_frames(torch.device("cuda")), PinnedFrames)
    monkeypatch.setenv(PINNED_FRAMES_ENV, "0")
    assert pinned_frames(torch.device("cuda")) is None


def test_a_read_into_a_block_returns_the_frames_of_a_plain_read() -> None:
    pool = BlockPool(Recording())
    plain = decode_video(CLIP).frames
    sunk = decode_video(CLIP, sink=PinnedFrames(pool)).frames
    assert in_block(sunk.frames, pool)
    assert sunk.indices == plain.indices and np.array_equal(sunk.frames, plain.frames)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_reads_land_in_page_locked_memory(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dycoke.pinned_frames as module

    monkeypatch.setattr(module, "_POOL", BlockPool())
    block = lock_block(3 * 4096)
    assert torch.from_numpy(block).is_pinned()
    gpu = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda", dtype="float32"))
    prepared = gpu.prepare(CLIP)
    assert torch.from_numpy(prepared.frames.frames).is_pinned()
    expected = torch.as_tensor(decode_video(CLIP).frames.frames).cuda()
    assert torch.equal(torch.as_tensor(prepared.frames.frames).cuda(non_blocking=True), expected)
    del prepared
    answers = {}
    for pinned in ("1", "0"):
        monkeypatch.setenv(PINNED_FRAMES_ENV, pinned)
        answers[pinned] = gpu.ask(CLIP, "What is here?", num_frames=24, max_new_tokens=8).token_ids
    assert answers["1"] == answers["0"]
