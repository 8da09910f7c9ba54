"""What a one-shot ``dycoke ask`` pays on its first run in a fresh process, per decoder.

CUDA-graph capture happens inside the first answer; the fused decode step's Triton kernels compile on
their first use ever on a machine (Triton keeps them on disk, in ``TRITON_CACHE_DIR``; ``dycoke ask``
compiles them beside the weight load). This measures what the first answer pays for both. Each
decoder runs in its own fresh process, with Triton's disk cache as it is (``warm``) and, with
``--kernel-cache warm fresh``, also with an empty one (``fresh``: the compile inside the first answer):

    python benchmarks/first_run.py --size 7b --decoders hf graph graph:unfused --kernel-cache warm fresh \
        --out benchmarks/results/first-run-7b-h200.json

Per decoder (``graph:unfused``: the model's own modules each step): the first answer (CUDA context and
kernels warm from model construction only), then two more; total time from the video file to the 64th
token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(size: str, decoder: str, video: str, frames: int, new_tokens: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.bench_methods import build, forced_generation
    from dycoke.config import MethodOptions, RunOptions, VideoOptions

    qa = build(size)
    options = RunOptions(
        video=VideoOptions(num_frames=frames),
        generation=forced_generation(decoder, new_tokens),
        method=MethodOptions(method="dycoke"),
    )
    totals = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        qa.ask(video, "What happens?", options)
        torch.cuda.synchronize()
        totals.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"decoder": decoder, "first_ms": totals[0], "then_ms": totals[1:]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b")
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decoders", nargs="+", default=["hf", "graph"], help="hf, graph, graph:unfused, static")
    parser.add_argument(
        "--kernel-cache", nargs="+", choices=["warm", "fresh"], default=["warm"], help="Triton's disk cache"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.size, args.child, args.video, args.frames, args.new_tokens)
        return
    rows = []
    for cache in args.kernel_cache:
        for decoder in args.decoders:
            command = [sys.executable, __file__, "--child", decoder, "--size", args.size, "--video", args.video]
            command += ["--frames", str(args.frames), "--new-tokens", str(args.new_tokens)]
            with tempfile.TemporaryDirectory() as empty:
                env = dict(os.environ, **({"TRITON_CACHE_DIR": empty} if cache == "fresh" else {}))
                out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT, env=env)
            rows.append({"kernel_cache": cache, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "size": args.size, "frames": args.frames, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
