"""Reading a video for a run, timed, without importing torch: ``start_reading`` decodes on a thread
while the caller imports torch and loads the model (the command line's cold start overlaps them)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dycoke.config import VideoOptions
from dycoke.video import VideoFrames, read_video


@dataclass
class DecodedVideo:
    """Frames sampled from a video file, and how long decoding took."""

    frames: VideoFrames
    path: str
    decode_s: float


def decode_video(video: str | Path, options: VideoOptions | None = None) -> DecodedVideo:
    """Sample and decode frames (no model needed: bad files are reported before any model loads)."""
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
    )
    return DecodedVideo(frames=frames, path=str(video), decode_s=time.perf_counter() - t0)


def start_reading(video: str | Path, options: VideoOptions | None = None) -> Future[DecodedVideo]:
    """``decode_video`` on a background thread; ``result()`` returns it or raises its ``VideoError``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dycoke-read")
    future = pool.submit(decode_video, video, options)
    pool.shutdown(wait=False)  # the thread ends with the decode
    return future
