"""Where one decode step's GPU time goes, by kernel family, with and without the fused step (CUDA).

    python benchmarks/profile_step.py --size 7b --prompt 3200 [--batch 1]

Random-weight model at the real shape, random prompt embeddings of ``--prompt`` tokens. Per variant
(fused with the Triton GEMV / the same with the down projection on cuBLAS / fused with cuBLAS
projections / module-by-module): the CUDA-graph
decoder's ms/token (median of 5 runs of 64 tokens less one of 2 tokens), and the GPU time per step
by kernel family from two eager profiled runs (34 and 2 tokens; their difference over 32 steps:
prefill and the first steps cancel). The gap between a step's kernel time and its graph time is what
launches and idle cost inside the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build
from benchmarks.kernel_families import kernel_family
from dycoke.decoding.fused import GEMV_ENV
from dycoke.decoding.static import StaticGreedyDecoder

FAMILIES = (
    ("attention", ("fmha", "flash", "attention", "cudnn")),
    ("gemm", ("gemm", "cutlass", "sm90", "nvjet", "xmma", "gemv", "splitk")),
    ("triton", ("_kernel",)),
    ("argmax/reduce", ("reduce", "argmax", "arg_max")),
)


def decode(model: Any, embeds: torch.Tensor, mask: torch.Tensor, tokens: int, *, graph: bool, fused: bool) -> None:
    decoder = StaticGreedyDecoder(
        model, max_new_tokens=tokens, min_new_tokens=tokens, eos_ids=[0], pad_id=0, use_graph=graph, fused=fused
    )
    with torch.inference_mode():
        decoder.generate(embeds, mask)
    torch.cuda.synchronize()


def step_ms(model: Any, embeds: torch.Tensor, mask: torch.Tensor, fused: bool) -> float:
    runs = []
    for _ in range(6):
        t0 = time.perf_counter()
        decode(model, embeds, mask, 2, graph=True, fused=fused)
        t1 = time.perf_counter()
        decode(model, embeds, mask, 64, graph=True, fused=fused)
        t2 = time.perf_counter()
        runs.append(((t2 - t1) - (t1 - t0)) / 62 * 1000)
    return statistics.median(runs[1:])


def kernel_times(prof: Any) -> dict[str, Any]:
    """GPU milliseconds of a finished profile by kernel family, and (milliseconds, calls) by kernel."""
    totals: dict[str, float] = defaultdict(float)
    names: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        if event.device_time_total <= 0:
            continue
        totals[kernel_family(event.key, FAMILIES)] += event.device_time_total / 1000
        names[event.key[:100]] = (event.device_time_total / 1000, event.count)
    return {"families": totals, "names": names}


def per_step(
    long: dict[str, Any], short: dict[str, Any], steps: int = 32, most: int = 14
) -> tuple[dict[str, float], list[tuple[float, int, str]]]:
    """Two runs' ``kernel_times`` that differ by ``steps`` decode steps -> milliseconds per step by
    family, and the ``most`` costliest kernels per step as (ms, calls, name): the rest cancels."""
    families = {k: (v - short["families"].get(k, 0.0)) / steps for k, v in long["families"].items()}
    top = sorted(
        (
            (
                (ms - short["names"].get(n, (0.0, 0))[0]) / steps,
                (count - short["names"].get(n, (0.0, 0))[1]) // steps,
                n,
            )
            for n, (ms, count) in long["names"].items()
        ),
        reverse=True,
    )[:most]
    return families, top


def kernel_ms(model: Any, embeds: torch.Tensor, mask: torch.Tensor, tokens: int, fused: bool) -> dict[str, Any]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode(model, embeds, mask, tokens, graph=False, fused=fused)
    return kernel_times(prof)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7b")
    parser.add_argument("--prompt", type=int, default=3200)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out")
    parser.add_argument("--skip-modules", action="store_true", help="leave the module-by-module step out")
    args = parser.parse_args()
    qa = build(args.size)
    model = qa.loaded.model
    dim = qa.loaded.text_config.hidden_size
    embeds = torch.randn(args.batch, args.prompt, dim, device="cuda", dtype=torch.bfloat16) * 0.02
    mask = torch.ones(args.batch, args.prompt, dtype=torch.long, device="cuda")
    result: dict[str, Any] = {"size": args.size, "prompt": args.prompt, "batch": args.batch}
    variants = (("fused", True, "triton"), ("fused-cublas-down", True, "cublas-down"), ("fused-cublas", True, "cublas"))
    for label, fused, gemv in (*variants, *(() if args.skip_modules else (("modules", False, ""),))):
        os.environ[GEMV_ENV] = gemv
        decode(model, embeds, mask, 4, graph=False, fused=fused)
        graph_ms = step_ms(model, embeds, mask, fused)
        families, top = per_step(kernel_ms(model, embeds, mask, 34, fused), kernel_ms(model, embeds, mask, 2, fused))
        result[label] = {
            "graph_ms_per_token": graph_ms,
            "kernel_ms_per_step": sum(families.values()),
            "by_family": {k: round(v, 4) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "top_kernels_per_step": [{"ms": round(ms, 4), "calls": c, "name": n} for ms, c, n in top],
        }
        print(label, json.dumps(result[label], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
