"""How many threads should convert a read's decoded frames to RGB (``dycoke.video.convert``)?

For each clip and frame count, alternating run by run: ``read_video`` with the frames converted as
before this module (PyAV's ``to_ndarray`` on the decoding thread: a new swscale context per frame,
with automatic slice threads), and with ``RgbConverter`` at each ``--threads`` count (1: on the
decoding thread, single-threaded swscale contexts kept per thread). Medians of wall seconds.

    python benchmarks/try_rgb_conversion.py --videos samples/bigbuckbunny.mp4 --frames 32 128 \\
        --threads 1 2 4 8 --repeats 5 --out benchmarks/results/rgb-conversion-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.video import convert, read_video
from dycoke.video import readers as video_readers

AS_BEFORE = "as-before"


class _AsBefore(convert.RgbConverter):
    """The conversion this module replaced: PyAV's own, on the decoding thread."""

    def __init__(self, store: convert.Store, size: tuple[int, int], threads: int) -> None:
        super().__init__(store, size, 1)

    def submit(self, position: int, frame: Any) -> None:
        if (frame.height, frame.width) == self.size:
            rgb = frame.to_ndarray(format="rgb24")
        else:
            scaled = frame.reformat(format="rgb24").reformat(
                width=self.size[1], height=self.size[0], interpolation="BICUBIC"
            )
            rgb = scaled.to_ndarray()
        self.store.put(position, np.asarray(rgb))


def timed_read(video: str, frames: int, variant: str) -> float:
    original = video_readers.RgbConverter
    if variant == AS_BEFORE:
        video_readers.RgbConverter = _AsBefore  # type: ignore[misc]
    else:
        convert.CONVERT_THREADS = int(variant)
    try:
        started = time.perf_counter()
        read_video(video, num_frames=frames)
        return time.perf_counter() - started
    finally:
        video_readers.RgbConverter = original  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", nargs="+", default=["samples/bigbuckbunny.mp4"])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    variants = [AS_BEFORE, *map(str, args.threads)]
    rows: list[dict[str, Any]] = []
    for video in args.videos:
        for frames in args.frames:
            times: dict[str, list[float]] = {v: [] for v in variants}
            for variant in variants:
                timed_read(video, frames, variant)  # warm-up: page cache, allocator
            for _ in range(args.repeats):
                for variant in variants:
                    times[variant].append(timed_read(video, frames, variant))
            row = {"video": Path(video).name, "frames": frames}
            row |= {v: round(statistics.median(t), 4) for v, t in times.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "cpus": len(os.sched_getaffinity(0)), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
