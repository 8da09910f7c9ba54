"""What a forked reader (``dycoke.frame_stream``) costs beside reading on threads in the process.

For each frame count, alternating: ``decode_video`` in this process; ``FrameStream`` drained by an idle
parent, into new shared memory (a process's first read) and into the memory of an earlier read that
the process kept (``frame_stream._release``); the hand-over the forked reader replaced (a forked
``ProcessPoolExecutor`` worker returning the frames pickled); and a bare ``os.fork()`` of this process
(the child exits at once). With ``--model-gib N`` the process first holds N GiB on the GPU and a CUDA context, as a
loaded model does.

    python benchmarks/try_forked_reading.py --frames 32 128 --repeats 3 --model-gib 16 \\
        --out benchmarks/results/forked-reading-h200.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke import frame_stream
from dycoke.config import VideoOptions
from dycoke.frame_stream import FrameStream
from dycoke.reading import decode_video


def streamed(video: str, options: VideoOptions, reuse: bool) -> float:
    if not reuse:
        frame_stream._IDLE.clear()
    started = time.perf_counter()
    with FrameStream(video, options) as stream:
        while stream.landed() is not None:
            pass
        stream.result()
    return time.perf_counter() - started


def pickled(video: str, options: VideoOptions) -> float:
    started = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(decode_video, video, options).result()
    return time.perf_counter() - started


def bare_fork() -> float:
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-gib", type=float, default=0.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    held: Any = None
    if args.model_gib:
        import torch

        held = torch.empty(int(args.model_gib * 2**30), dtype=torch.uint8, device="cuda")
    rows = []
    for frames in args.frames:
        options = VideoOptions(num_frames=frames)
        decode_video(args.video, options)  # warm: file cache, codecs
        names = ("threads", "forked-new-memory", "forked-reused-memory", "forked-pickled", "fork-only")
        runs: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            decode_video(args.video, options)
            runs["threads"].append(time.perf_counter() - t0)
            runs["forked-new-memory"].append(streamed(args.video, options, reuse=False))
            runs["forked-reused-memory"].append(streamed(args.video, options, reuse=True))
            runs["forked-pickled"].append(pickled(args.video, options))
            runs["fork-only"].append(bare_fork())
        row = {"frames": frames, **{k: 1000 * statistics.median(v) for k, v in runs.items()}}
        row["all_ms"] = {k: [round(1000 * x, 1) for x in v] for k, v in runs.items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    del held
    if args.out:
        command = "python benchmarks/try_forked_reading.py " + " ".join(sys.argv[1:])
        Path(args.out).write_text(json.dumps({"command": command, "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
