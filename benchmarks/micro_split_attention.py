"""Micro-benchmark: the decode step's masked attention, torch's SDPA against ``kernels.split_attention`` (CUDA).

    python benchmarks/micro_split_attention.py --out benchmarks/results/split-attention-h200.json

One new query per row over a static cache with a DP-like additive bias (30% of the slots kept), 7B
heads (28 query / 4 key-value heads of 128, bf16). Per row count and cache length: the steady time of
one call (CUDA events over a graph of 28 calls, one per layer, replayed 200 times) and what the first
call at a length not seen before costs (host clock, synchronised: SDPA on Hopper takes cuDNN, which
builds a plan per length; the split kernel compiled once). ``--sweep`` times every combination of
the split kernel's launch settings (``kernels.SPLIT_ATTENTION_CONFIG``) on four shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.micro_gemv import graph_us
from dycoke.decoding import kernels


def case(
    b: int, length: int, hq: int = 28, hkv: int = 4, d: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    query = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(b, length, device="cuda") < 0.3
    keep[:, -1] = True
    storage = torch.zeros(b, 1, 1, length + (-length) % 16, device="cuda", dtype=torch.bfloat16)
    bias = storage[..., :length].masked_fill_(~keep.view(b, 1, 1, length), float("-inf"))
    return query, key, torch.randn_like(key), bias


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, enable_gqa=True)


def split(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return kernels.split_attention(query, key, value, bias, query.shape[-1] ** -0.5)


def steady_us(fn: Any, tensors: tuple[torch.Tensor, ...], layers: int = 28, replays: int = 200) -> float:
    """Microseconds per call of ``fn(*tensors)``, ``layers`` calls replayed from one CUDA graph."""
    return graph_us([lambda: fn(*tensors)] * layers, repeats=replays)


def first_call_ms(fn: Any, tensors: tuple[torch.Tensor, ...]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*tensors)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sweep", action="store_true", help="also time every launch setting on four shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    split(*case(1, 64))  # the kernels compiled (or loaded from Triton's cache) before any timing
    sdpa(*case(1, 64))
    rows = []
    for b in (1, 8, 32):
        for length in (1_000, 3_200, 6_400, 12_800, 25_600):
            if b * length > 32 * 12_800:
                continue
            tensors = case(b, length)
            exact = kernels.split_attention_torch(*tensors, 128**-0.5)
            row: dict[str, Any] = {"rows": b, "length": length}
            for name, fn in (("sdpa", sdpa), ("split", split)):
                fresh = [first_call_ms(fn, case(b, length + 1 + k)) for k in range(3)]  # lengths not seen yet
                out = fn(*tensors)
                out = out.transpose(1, 2) if name == "sdpa" else out
                row[name] = {
                    "us_per_call": round(steady_us(fn, tensors), 2),
                    "first_call_at_a_new_length_ms": round(statistics.median(fresh), 2),
                    "largest_error": float((out.float() - exact.float()).abs().max()),
                }
            row["split_vs_sdpa"] = round(row["split"]["us_per_call"] / row["sdpa"]["us_per_call"], 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    sweep: list[tuple[float, dict[str, Any]]] = []
    if args.sweep:  # the launch settings, on the shapes a batch-1 answer and a small batch meet
        shapes = [(1, 3_200), (1, 12_800), (1, 25_600), (8, 3_200)]
        for block, per_sm, warps, stages in itertools.product((32, 64, 128), (1, 2, 4), (4, 8), (2, 3)):
            config = {"block": block, "per_sm": per_sm, "num_warps": warps, "num_stages": stages}
            times = {}
            for b, length in shapes:
                tensors = case(b, length)

                def tuned(
                    query: torch.Tensor,
                    key: torch.Tensor,
                    value: torch.Tensor,
                    bias: torch.Tensor,
                    settings: dict[str, int] = config,
                ) -> torch.Tensor:
                    return kernels.split_attention(query, key, value, bias, 128**-0.5, config=settings)

                times[f"{b}x{length}"] = round(steady_us(tuned, tensors), 2)
            total = round(sum(times.values()), 2)
            sweep.append((total, {**config, "us_per_call": times, "sum": total}))
            print(json.dumps(sweep[-1][1]), flush=True)
        sweep.sort(key=lambda pair: pair[0])
    result = {
        "command": "python " + " ".join(sys.argv),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": kernels.SPLIT_ATTENTION_CONFIG,
        "rows": rows,
        "sweep_best_first": [row for _, row in sweep],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
