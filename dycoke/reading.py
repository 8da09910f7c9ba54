"""Reading a video for a run, timed, without importing torch: ``start_reading`` decodes beside the
caller while it imports torch and loads the model (the command line's cold start overlaps them)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dycoke.config import VideoOptions
from dycoke.video import VideoFrames, read_video
from dycoke.video.readers import FrameSink

if TYPE_CHECKING:
    from dycoke.frame_stream import FrameStream


@dataclass
class DecodedVideo:
    """Frames sampled from a video file, and how long decoding took."""

    frames: VideoFrames
    path: str
    decode_s: float


def decode_video(
    video: str | Path, options: VideoOptions | None = None, *, sink: FrameSink | None = None
) -> DecodedVideo:
    """Sample and decode frames (no model needed: bad files are reported before any model loads);
    ``sink``: where they go (``read_video``)."""
    options = options or VideoOptions()
    t0 = time.perf_counter()
    frames = read_video(
        video,
        num_frames=options.num_frames,
        fps=options.fps,
        max_frames=options.max_frames,
        start_s=options.start_s,
        end_s=options.end_s,
        seek=options.seek,
        sink=sink,
    )
    return DecodedVideo(frames=frames, path=str(video), decode_s=time.perf_counter() - t0)


def _wait_for(stream: FrameStream) -> DecodedVideo:
    with stream:
        return stream.result()


def _only_main_thread() -> bool:
    main = threading.main_thread()
    return all(t is main or getattr(t, "fork_safe", False) for t in threading.enumerate())


def start_reading(
    video: str | Path, options: VideoOptions | None = None, *, separate_process: bool = False
) -> Future[DecodedVideo]:
    """``decode_video`` in the background; ``result()`` returns it or raises its ``VideoError``.

    On a thread by default. ``separate_process=True`` (Linux) decodes in a forked child instead
    (``dycoke.frame_stream``: the frames land in memory both processes map), for a caller that is about
    to import torch and transformers: the readers' Python work then takes nothing from that
    single-threaded import (on a thread, a 3-min 1080p read slowed the model-code import by 1.6 s on the
    16-core H200 machine, ``benchmarks/try_import_contention.py``). A process that already runs other
    threads reads on a thread anyway: a forked child could inherit a lock one of them holds (a thread
    with a true ``fork_safe`` attribute, such as a profiler's sampler, does not count)."""
    from dycoke.frame_stream import fork_reader

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dycoke-read")
    stream = fork_reader(video, options, notify=False) if separate_process and _only_main_thread() else None
    if stream is not None:
        future = pool.submit(_wait_for, stream)  # the thread waits on the child's socket, without the GIL
    else:
        future = pool.submit(decode_video, video, options)
    pool.shutdown(wait=False)  # the worker ends with the decode
    return future
