"""Reading decoded frames straight into page-locked host memory, for a model on a GPU.

The frames are the largest host tensor a run moves to the GPU. 128 frames of 720p (338 MiB) uploaded
in 52-55 ms from ordinary memory and in 6.5-6.8 ms from page-locked memory on the H200 machine; the whole
preprocessing took 59-63 ms against 13 ms (``benchmarks/results/pinned-frames-h200.txt``).

How the memory is locked matters more than that. torch's pinned allocation (``cudaHostAlloc``: one
thread faults in and locks 4 KiB pages, rounded up to a power of two) took 200-324 ms for those 338
MiB, four reads' worth of savings, paid by a process's first answer. Here the memory is ordinary
(numpy asks for huge pages), several threads fault it in, and ``cudaHostRegister`` then locks pages
already there: 24-35 ms in all (``pin-probe-h200.txt``, ``pinned-frames-h200.txt``), less than the
upload saves. A process keeps at most ``MAX_BLOCKS`` blocks (``BlockPool``) and lends each to one read at a time, so
its later reads lock nothing.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable

import numpy as np

from dycoke.switches import switch
from dycoke.video.plan import _cpu_count

PINNED_FRAMES_ENV = "DYCOKE_PINNED_FRAMES"

MAX_BLOCKS = 2
"""Blocks a process keeps: a batch reads the next video while the current one's frames are in use."""

_TOUCH_THREADS = 8
_PAGE = 4096
_PORTABLE = 1  # cudaHostRegisterPortable: locked for every GPU's context (a model split over several)


def _fault_in(block: np.ndarray) -> None:
    """Write one byte per page of ``block`` from several threads (numpy releases the interpreter)."""
    threads = min(_TOUCH_THREADS, _cpu_count())
    step = -(-block.nbytes // threads // _PAGE) * _PAGE
    parts = [block[start : start + step] for start in range(0, block.nbytes, step)]
    workers = [threading.Thread(target=part[::_PAGE].fill, args=(0,)) for part in parts[1:]]
    for worker in workers:
        worker.start()
    parts[0][::_PAGE].fill(0)
    for worker in workers:
        worker.join()


def _unregister(address: int) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(address)


def lock_block(nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory, faulted in and page-locked for the GPUs (``cudaHostRegister``), as a
    1-D uint8 array that unlocks its pages before they are freed. Raises ``RuntimeError`` when the
    driver refuses."""
    import torch

    block = np.empty(nbytes, dtype=np.uint8)
    _fault_in(block)
    address = block.ctypes.data
    try:
        error = torch.cuda.cudart().cudaHostRegister(address, nbytes, _PORTABLE)
    except (AssertionError, OSError) as exc:  # torch without CUDA, or no driver
        raise RuntimeError(f"cannot page-lock host memory: {exc}") from exc
    if int(error) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {error}")
    weakref.finalize(block, _unregister, address).atexit = False  # runs before numpy frees the memory
    return block


class _Lease:
    """The owner numpy sees of one frames array in a block: the base of the array and of every view
    of it, so the block comes back only when none is left."""

    def __init__(self, block: np.ndarray, shape: tuple[int, int, int, int]) -> None:
        self.block = block
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": shape, "typestr": "|u1", "version": 3}


class BlockPool:
    """At most ``max_blocks`` locked blocks, each lent to one frames array at a time.

    ``make(nbytes)`` returns a 1-D uint8 array of ``nbytes`` (``lock_block``; a test can give ordinary
    memory); a ``RuntimeError`` from it (page-locked memory refused) stops the pool from trying again."""

    def __init__(self, make: Callable[[int], np.ndarray] = lock_block, max_blocks: int = MAX_BLOCKS) -> None:
        self.make = make
        self.max_blocks = max_blocks
        self.blocks: list[np.ndarray] = []
        self.lent: set[int] = set()  # ids of blocks a frames array lives in
        self.lock = threading.Lock()
        self.refused = False

    def frames(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """A writable (F, H, W, 3) uint8 array in a free block of at least its size, lent until the
        array and every view of it are gone. Without one, a block is made for it (replacing the smallest
        free block when the pool is full); when every block is in use, or locking is refused, the array
        is in ordinary memory."""
        nbytes = math.prod(shape)
        with self.lock:
            block = next((b for b in self.blocks if id(b) not in self.lent and b.nbytes >= nbytes), None)
            if block is None:
                block = self._new_block(nbytes)
            if block is None:
                return np.empty(shape, dtype=np.uint8)
            self.lent.add(id(block))
        lease = _Lease(block, shape)
        weakref.finalize(lease, self._give_back, id(block)).atexit = False
        return np.asarray(lease)

    def _new_block(self, nbytes: int) -> np.ndarray | None:
        """A new block in the pool, or None (refused, or the pool full of blocks in use). Called with
        the lock held."""
        free = [b for b in self.blocks if id(b) not in self.lent]  # all too small
        if self.refused or (len(self.blocks) >= self.max_blocks and not free):
            return None
        try:
            block = self.make(nbytes)
        except RuntimeError:
            self.refused = True
            return None
        if len(self.blocks) >= self.max_blocks:
            smallest = min(free, key=lambda b: b.nbytes)
            self.blocks = [b for b in self.blocks if b is not smallest]  # by identity: == on arrays compares values
        self.blocks.append(block)
        return block

    def _give_back(self, block_id: int) -> None:
        with self.lock:
            self.lent.discard(block_id)


_POOL = BlockPool()


class PinnedFrames:
    """Where a read for a model on a GPU puts its frames (a ``dycoke.video.readers.FrameSink``):
    page-locked memory from the process's ``BlockPool``."""

    in_order = False

    def __init__(self, pool: BlockPool | None = None) -> None:
        self.pool = pool or _POOL

    def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """(F, H, W, 3) uint8 (see ``BlockPool.frames``)."""
        return self.pool.frames(shape)

    def landed(self, slots: list[int]) -> None:
        """Nobody waits for single frames."""


def pinned_frames(device: object) -> PinnedFrames | None:
    """The sink a read for a model on ``device`` (a ``torch.device``) uses: ``PinnedFrames`` for a GPU,
    unless ``DYCOKE_PINNED_FRAMES=0``; None (ordinary memory) elsewhere."""
    if getattr(device, "type", None) != "cuda" or not switch(PINNED_FRAMES_ENV, True):
        return None
    return PinnedFrames()
