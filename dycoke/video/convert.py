"""Decoded PyAV frames to RGB arrays on a small pool of threads, beside the thread that decodes.

A reader's loop used to convert each frame itself (swscale: YUV to RGB, then a bicubic scale when the
frame is decoded at a reduced size) and copy it into the store, so the conversions of a one-reader
video (a short clip with one key frame: every target in one forward pass) ran one after another,
after FFmpeg's own decoding threads had done their part in parallel. PyAV's ``to_ndarray`` also made a
new swscale context per frame, with its default of "automatic" slice threads: a pool of threads per
CPU started and stopped for every frame. Here each conversion thread keeps its own contexts, each
single-threaded, and converts whole frames in parallel with the others and with the decoder. The
results are swscale's own, byte for byte (single-threaded swscale gives the same bytes as sliced).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from dycoke.video.plan import _cpu_count

CONVERT_THREADS = 8
"""Conversion threads per read, at most one per CPU (see ``RgbConverter``). On the 16-core H200 machine
(``benchmarks/try_rgb_conversion.py``): 128 frames of the 720p sample 0.20 s on 4 or 8 threads, 0.24 s
on 2, 0.33 s on 1, 0.81 s before; 128 frames of 1 min of 1080p 0.85 and 0.78 s on 8, 0.97 and 0.90 s
on 4 (two runs), 1.16-1.20 s before."""


def convert_threads() -> int:
    """Threads converting one read's frames to RGB: ``CONVERT_THREADS``, at most one per CPU."""
    return max(1, min(CONVERT_THREADS, _cpu_count()))


class Store(Protocol):
    """Where converted frames go (``dycoke.video.readers.FrameStore``)."""

    def put(self, position: int, frame: np.ndarray) -> None: ...


class _Contexts(threading.local):
    """One thread's swscale contexts: to RGB at the decoded size, and the bicubic scale after it."""

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self.to_rgb = VideoReformatter()
        self.scale = VideoReformatter()


def convert_frame(frame: Any, size: tuple[int, int], contexts: _Contexts) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB at ``size`` = (H, W): converted to RGB at full size, then
    scaled bicubic by swscale (scaling the YUV planes first, or converting and scaling in one pass,
    strays 6x further from the full-size frame; see "Reduced-size decoding")."""
    rgb = contexts.to_rgb.reformat(frame, format="rgb24", threads=1)
    if (frame.height, frame.width) != size:
        rgb = contexts.scale.reformat(rgb, width=size[1], height=size[0], interpolation="BICUBIC", threads=1)
    return np.asarray(rgb.to_ndarray())


class RgbConverter:
    """Converts frames handed over by ``submit`` and puts each into ``store`` at its display position.

    With ``threads`` > 1, on that many threads, at most two frames per thread waiting (the decoding
    thread waits for room, so the decoder cannot run ahead and hold the whole video in YUV frames);
    with 1, on the calling thread. Used as a context manager: leaving it waits for every frame handed
    over and raises the first conversion's error (``submit`` raises it too, once seen, so that the
    decode stops early); leaving it on an exception drops the frames not yet started.
    """

    def __init__(self, store: Store, size: tuple[int, int], threads: int) -> None:
        self.store = store
        self.size = size
        self.contexts = _Contexts()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dycoke-rgb") if threads > 1 else None
        self.room = threading.BoundedSemaphore(2 * threads)
        self.error: BaseException | None = None  # the first conversion's

    def submit(self, position: int, frame: Any) -> None:
        """Convert ``frame`` and put it at ``position`` (now, or on a pool thread)."""
        if self.error is not None:
            raise self.error
        if self.pool is None:
            self.store.put(position, convert_frame(frame, self.size, self.contexts))
            return
        self.room.acquire()
        try:
            self.pool.submit(self._convert, position, frame)
        except BaseException:
            self.room.release()
            raise

    def _convert(self, position: int, frame: Any) -> None:
        try:
            self.store.put(position, convert_frame(frame, self.size, self.contexts))
        except BaseException as exc:  # raised to the reader by submit and __exit__
            self.error = self.error or exc
        finally:
            self.room.release()

    def __enter__(self) -> RgbConverter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.pool is None:
            return
        self.pool.shutdown(wait=True, cancel_futures=exc is not None)
        if exc is None and self.error is not None:
            raise self.error
