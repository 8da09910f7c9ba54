"""Where a long clip's read goes, and which decoder/reader/thread split is fastest on this machine.

    python benchmarks/tune_video_readers.py --clip .corpus/h264-1080p-3min.mp4 --out tune.json

For the 32 uniformly sampled frames (exact and keyframe targets), in one run, rounds interleaved:

- the fixed costs ``read_video`` pays before decoding: opening decord's reader (its index), decoding
  decord's first frame, the PyAV demux index;
- the decode itself, for decord (``get_batch`` per key-frame chunk, one reader per chunk) and PyAV
  (seek by timestamp, forward decode), over a grid of readers x FFmpeg threads per reader;
- ``read_video`` end to end and plain ``decord.VideoReader(...).get_batch`` on the same indices.

Medians of ``--repeats`` rounds; writes JSON (and prints a table). Frames are decoded at full size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _decord_read(name: str, threads: int, chunks: list[list[int]], size: tuple[int, int]) -> Any:
    import decord

    from dycoke.video.readers import FrameStore, _read_parallel

    store = FrameStore(name, [t for chunk in chunks for t in chunk], size)
    return _read_parallel(lambda: decord.VideoReader(name, num_threads=threads), None, chunks, store)


def _pyav_read(name: str, index: Any, runs: Any, size: tuple[int, int], readers: int, threads: int) -> Any:
    from dycoke.video.readers import _read_pyav

    return _read_pyav(name, index, runs, size, readers, threads)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", required=True, type=Path)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readers", type=int, nargs="+", default=[4, 8, 12, 16, 24])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import decord

    from dycoke.video import read_video
    from dycoke.video.index import demux_index
    from dycoke.video.plan import _cpu_count, _plan, keyframe_chunks, keyframe_targets
    from dycoke.video.sampling import uniform_indices

    name = str(args.clip)
    index = demux_index(name)
    indices = uniform_indices(index.num_frames, args.frames, 0, index.num_frames - 1)
    targets = {"exact": list(indices), "keyframe": keyframe_targets(indices, index.key_positions)}
    probe = decord.VideoReader(name)
    size = tuple(probe[0].shape[:2])
    del probe

    jobs: dict[str, Callable[[], Any]] = {
        "fixed/decord-open": lambda: decord.VideoReader(name, num_threads=_cpu_count()),
        "fixed/decord-open+first-frame": lambda: decord.VideoReader(name, num_threads=_cpu_count()).next().asnumpy(),
        "fixed/demux-index": lambda: demux_index(name),
        "plain-decord/exact": lambda: decord.VideoReader(name).get_batch(targets["exact"]).asnumpy(),
    }
    for seek in ("exact", "keyframe"):
        jobs[f"read_video/{seek}"] = lambda seek=seek: (
            read_video(  # type: ignore[misc]
                name, num_frames=args.frames, min_decode_side=None, seek=seek
            ).frames
        )
        runs = _plan(index, targets[seek])
        for readers in args.readers:
            for threads in args.threads:
                chunks = keyframe_chunks(targets[seek], index.key_positions, readers)

                jobs[f"decord/{seek}/r{len(chunks)}/t{threads}"] = partial(_decord_read, name, threads, chunks, size)
                jobs[f"pyav/{seek}/r{min(readers, len(runs))}/t{threads}"] = partial(
                    _pyav_read, name, index, runs, size, readers, threads
                )

    times: dict[str, list[float]] = {key: [] for key in jobs}
    reference: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):
        for key, job in jobs.items():
            seconds, out = _timed(job)
            times[key].append(seconds)
            seek = key.split("/")[1]
            if isinstance(out, np.ndarray) and out.ndim == 4 and seek in targets:
                if seek not in reference:
                    reference[seek] = out
                elif not np.array_equal(reference[seek], out):
                    raise SystemExit(f"{key}: frames differ from the first contender's")

    medians = {key: round(statistics.median(v), 4) for key, v in times.items()}
    for key, value in medians.items():
        print(f"{key:40s} {value:8.3f} s")
    result = {
        "benchmark": "video reader tuning",
        "command": "python benchmarks/tune_video_readers.py " + " ".join(argv or sys.argv[1:]),
        "cpus": _cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "clip": args.clip.name,
        "frames": index.num_frames,
        "key_frames": len(index.key_positions),
        "work": {seek: sum(r.cost for r in _plan(index, t)) for seek, t in targets.items()},
        "median_s": medians,
        "runs_s": {key: [round(v, 4) for v in values] for key, values in times.items()},
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
