"""One-token projections (GEMV) of the decode step: cuBLAS vs a Triton kernel, per configuration (CUDA).

    python benchmarks/micro_gemv.py --size 7b [--shapes down_silu ...] [--out FILE]

For each projection of the decode step at batch 1 (QKV, output, gate/up, down with SiLU*up folded into
its input, also cut into column slices, the LM head), 28 (the layer count) distinct weights are read
in turn inside a CUDA graph (as the decode step reads them: no weight stays in L2), and the graph's
replay time per call gives microseconds and GB/s, for ``torch.nn.functional.linear`` (cuBLAS) and for ``gemv`` in
``dycoke/decoding/kernels.py`` at each block configuration of the sweep. Every Triton result is checked
against a float32 reference first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.decoding import kernels
from dycoke.tiny import real_shape_config

LAYERS = 28


def graph_us(calls: list[Any], repeats: int = 20) -> float:
    """Microseconds per call of ``calls`` (each a no-argument function) replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up (and compile) outside the capture
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats / len(calls)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7b")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--shapes", nargs="+", help="only these (qkv, o, gate_up, down_silu, lm_head)")
    args = parser.parse_args()
    text = real_shape_config(args.size).text_config
    d, f, v = text.hidden_size, text.intermediate_size, text.vocab_size
    hq, hkv = text.num_attention_heads, text.num_key_value_heads
    head = d // hq
    shapes = {
        "qkv": ((hq + 2 * hkv) * head, d, True, False),
        "o": (d, hq * head, False, False),
        "gate_up": (2 * f, d, False, False),
        "down_silu": (d, f, False, True),
        "lm_head": (v, d, False, False),
    }
    dtype = torch.bfloat16
    results: dict[str, Any] = {"size": args.size, "gpu": torch.cuda.get_device_name(), "shapes": {}}
    sweep = list(itertools.product((4, 8, 16), (256, 512), (4, 8), (2, 4)))
    for name, (n, k, with_bias, silu_input) in shapes.items():
        if args.shapes and name not in args.shapes:
            continue
        layers = 1 if name == "lm_head" else LAYERS
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(layers)]
        biases = [torch.randn(n, device="cuda", dtype=dtype) * 0.02 if with_bias else None for _ in range(layers)]
        x = torch.randn(1, 2 * k if silu_input else k, device="cuda", dtype=dtype)
        x_in = kernels.silu_mul_torch(x) if silu_input else x
        out = torch.empty(1, n, device="cuda", dtype=dtype)
        first_bias = None if biases[0] is None else biases[0].float()
        reference = torch.nn.functional.linear(x_in.float(), weights[0].float(), first_bias)

        def module_way(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor = x, silu: bool = silu_input) -> Any:
            return lambda: torch.nn.functional.linear(kernels.silu_mul(x) if silu else x, w, b)

        def triton_way(w: torch.Tensor, b: torch.Tensor | None, config: dict[str, int], x: torch.Tensor = x) -> Any:
            target = None if config.get("split_k", 1) > 1 else out  # noqa: B023 (a split one returns its slices)
            return lambda: kernels.gemv(x, w, b, out=target, silu_input=silu_input, config=config)  # noqa: B023

        cublas = graph_us([module_way(w, b) for w, b in zip(weights, biases, strict=True)])
        bytes_per_call = n * k * 2
        row: dict[str, Any] = {"n": n, "k": k, "cublas_us": cublas, "cublas_tb_s": bytes_per_call / cublas / 1e6}
        row["triton"] = []
        configs = [
            {"block_n": block_n, "block_k": block_k, "num_warps": warps, "num_stages": stages}
            for block_n, block_k, warps, stages in sweep
        ]
        if name == "down_silu":  # its long rows cut into slices (the decode step's default: DOWN_GEMV_CONFIG)
            configs += [
                {"block_n": block_n, "block_k": 512, "num_warps": warps, "num_stages": 4, "split_k": split}
                for block_n, warps, split in itertools.product((4, 8, 16), (4, 8), (2, 4, 8))
            ]
        for config in configs:
            try:
                got = triton_way(weights[0], biases[0], config)()
                torch.cuda.synchronize()
                product = got.sum(dim=0) if got.dim() == 3 else got.float()
                error = (product - reference).abs().max().item()
                us = graph_us([triton_way(w, b, config) for w, b in zip(weights, biases, strict=True)])
            except Exception as failure:  # a configuration Triton cannot build (e.g. out of resources)
                row["triton"].append({**config, "error": str(failure).splitlines()[0][:160]})
                continue
            row["triton"].append({**config, "us": us, "tb_s": bytes_per_call / us / 1e6, "max_error": error})
        ok = [t for t in row["triton"] if "us" in t]
        row["best"] = min(ok, key=lambda t: t["us"]) if ok else None
        results["shapes"][name] = row
        best = row["best"]
        print(
            f"{name} ({n}x{k}): cuBLAS {cublas:.2f} us ({row['cublas_tb_s']:.2f} TB/s); "
            f"best Triton {best['us']:.2f} us ({best['tb_s']:.2f} TB/s) {best}",
            flush=True,
        )
        del weights
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
