"""Reading decoded frames straight into page-locked host memory, in a process that reads more than once.

The frames are the largest host tensor a run moves to the GPU. 128 frames of 720p (338 MiB) uploaded
in 52 ms from ordinary memory and in 6.5 ms from page-locked memory on the H200 machine; the whole
preprocessing took 63 ms against 13 ms (``benchmarks/results/pinned-frames-h200.txt``). But locking
memory is slow: the first page-locked array of that size took 218 ms, four reads' worth of savings, and
a process's first answer is what its user waits for. So a process keeps at most ``MAX_BLOCKS`` locked
blocks (``BlockPool``), lends each to one read at a time, and locks a new one on a background thread
after a read that found none free and large enough. That read, like a process's first, goes to
ordinary memory as before; the reads after it find the block.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable

import numpy as np
import torch

from dycoke.switches import switch

PINNED_FRAMES_ENV = "DYCOKE_PINNED_FRAMES"

MAX_BLOCKS = 2
"""Blocks a process keeps: a batch reads the next video while the current one's frames are in use."""


def _lock_block(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (torch's caching host allocator)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _Lease:
    """The owner numpy sees of one frames array in a block: the base of the array and of every view
    of it, so the block comes back only when none is left."""

    def __init__(self, block: torch.Tensor, shape: tuple[int, int, int, int]) -> None:
        self.block = block
        self.__array_interface__ = {"data": (block.data_ptr(), False), "shape": shape, "typestr": "|u1", "version": 3}


class BlockPool:
    """Locked blocks, each lent to one frames array at a time, made in the background on demand.

    ``make(nbytes)`` returns a 1-D uint8 tensor of at least ``nbytes`` (page-locked memory; a test can
    give ordinary memory); an error from it (page-locked memory refused) stops the pool from trying
    again."""

    def __init__(self, make: Callable[[int], torch.Tensor] = _lock_block, max_blocks: int = MAX_BLOCKS) -> None:
        self.make = make
        self.max_blocks = max_blocks
        self.blocks: list[torch.Tensor] = []
        self.lent: set[int] = set()  # ids of blocks a frames array lives in
        self.lock = threading.Lock()
        self.maker: threading.Thread | None = None
        self.refused = False

    def frames(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """A writable (F, H, W, 3) uint8 array: in a free block large enough, lent until the array (and
        every view of it) is gone; else in ordinary memory, and a block that size is made for later."""
        nbytes = math.prod(shape)
        with self.lock:
            for block in self.blocks:
                if id(block) not in self.lent and block.numel() >= nbytes:
                    self.lent.add(id(block))
                    lease = _Lease(block, shape)
                    weakref.finalize(lease, self._give_back, id(block))
                    return np.asarray(lease)
            self._make_later(nbytes)
        return np.empty(shape, dtype=np.uint8)

    def wait(self) -> None:
        """Wait for a block being made (tests, benchmarks)."""
        maker = self.maker
        if maker is not None:
            maker.join()

    def _give_back(self, block_id: int) -> None:
        with self.lock:
            self.lent.discard(block_id)

    def _make_later(self, nbytes: int) -> None:
        """Start making a block of ``nbytes`` unless one is being made, or the pool is full of blocks in
        use (a free block too small is replaced). Called with the lock held."""
        if self.refused or (self.maker is not None and self.maker.is_alive()):
            return
        free = [b for b in self.blocks if id(b) not in self.lent]  # too small, or frames() would have lent it
        if len(self.blocks) >= self.max_blocks and not free:
            return
        self.maker = threading.Thread(target=self._make, args=(nbytes,), name="dycoke-pin", daemon=True)
        self.maker.start()

    def _make(self, nbytes: int) -> None:
        try:
            block = self.make(nbytes)
        except RuntimeError:  # out of page-locked memory, or no usable driver after all
            self.refused = True
            return
        with self.lock:
            if len(self.blocks) >= self.max_blocks:
                free = [b for b in self.blocks if id(b) not in self.lent]
                if not free:
                    return
                self.blocks.remove(min(free, key=lambda b: b.numel()))
            self.blocks.append(block)


_POOL = BlockPool()


class PinnedFrames:
    """Where a read for a model on a GPU puts its frames (a ``dycoke.video.readers.FrameSink``):
    page-locked memory from the process's ``BlockPool`` when a block is free, else ordinary memory."""

    in_order = False

    def __init__(self, pool: BlockPool | None = None) -> None:
        self.pool = pool or _POOL

    def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """(F, H, W, 3) uint8 (see ``BlockPool.frames``)."""
        return self.pool.frames(shape)

    def landed(self, slots: list[int]) -> None:
        """Nobody waits for single frames."""


def pinned_frames(device: torch.device) -> PinnedFrames | None:
    """The sink a read for a model on ``device`` uses: ``PinnedFrames`` for a GPU, unless
    ``DYCOKE_PINNED_FRAMES=0``; None (ordinary memory) elsewhere."""
    if device.type != "cuda" or not switch(PINNED_FRAMES_ENV, True):
        return None
    return PinnedFrames()
