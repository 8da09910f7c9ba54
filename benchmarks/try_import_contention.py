"""Experiment for the cold start (#15): does reading the video beside the imports slow the imports?

A fresh ``dycoke ask`` starts reading the video on threads right away, then imports transformers'
model code (pure Python, single-threaded) while the readers decode. On 2 cores the model-code import
took 3.2-3.8 s with a 3-min 1080p read beside it against 2.5-2.9 s alone (this machine, by hand). This
script measures it as fresh processes, alternating, for each reader count (``DYCOKE_DECODE_WORKERS``):

    python benchmarks/try_import_contention.py --video .corpus/h264-1080p-3min.mp4 --workers 0 4 8 16 \\
        --repeats 3 --out benchmarks/results/import-contention-h200.json

``0`` workers: no read at all (the import alone). Per run: seconds of ``import torch``, of the model code
(``dycoke.pipeline``), and how long the read still ran after the import (what the model load must
cover).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def child(video: str, workers: int) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    t1 = time.perf_counter()
    reading = None
    if workers:
        from dycoke.config import VideoOptions
        from dycoke.reading import start_reading

        reading = start_reading(video, VideoOptions(num_frames=32))
    t2 = time.perf_counter()
    from dycoke.pipeline import VideoQA  # noqa: F401

    t3 = time.perf_counter()
    if reading is not None:
        reading.result()
    t4 = time.perf_counter()
    print(json.dumps({"torch_s": t1 - t0, "model_code_s": t3 - t2, "read_after_import_s": t4 - t3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--video", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(ROOT))
        child(args.video, args.child)
        return
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:  # alternating, so drifts hit every setting alike
            env = {**os.environ, "DYCOKE_DECODE_WORKERS": str(max(workers, 1))}
            command = [sys.executable, __file__, "--video", args.video, "--child", str(workers)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
            runs[workers].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result: dict[str, Any] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "rows": []}
    for workers, rows in runs.items():
        row = {"workers": workers, **{k: statistics.median(r[k] for r in rows) for k in rows[0]}, "runs": rows}
        result["rows"].append(row)
        print(
            f"workers {workers}: torch {row['torch_s']:.2f} s, model code {row['model_code_s']:.2f} s, "
            f"read after the import {row['read_after_import_s']:.2f} s",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
