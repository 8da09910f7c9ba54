"""Where the vision encoder's time goes, and what the GPU's attention back ends make of it (CUDA).

    python benchmarks/profile_vision.py --size 7b --frames 32 [--compile]

Builds the random-weight model at the real shape, then times transformers' ``get_video_features`` and
``encode_frames`` (the same computation with faster memory layouts; checked bit-equal here) on
``--frames`` frames of 384x384, the latter for each SDPA back end (PyTorch's choice, flash, memory
efficient, cuDNN); CUDA-synchronised medians of 10; one profiled call sorted by kernel family; the
GEMMs of the tower alone at the same shapes (their achieved TFLOP/s); with ``--compile`` also
``torch.compile`` of the tower (its compile time reported beside its speed). Prints JSON at the end.
"""

from __future__ import annotations

import argparse
import json
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
from dycoke.vision import encode_frames

FAMILIES = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "cutlass", "sm90", "nvjet", "xmma", "matmul")),
    ("conv", ("conv",)),
    ("layer_norm", ("layer_norm", "layernorm")),
    ("gelu", ("gelu",)),
    ("pooling", ("upsample", "interpolate", "bilinear")),
)


def timed(fn: Any, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` (CUDA-synchronised), after two warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def gemm_floor(config: Any, frames: int) -> dict[str, float]:
    """The tower's GEMMs alone (per layer: QKV, out, FFN up, FFN down; times the layer count)."""
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = frames * (config.image_size // config.patch_size) ** 2
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, f, device="cuda", dtype=torch.bfloat16)
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in ((3 * d, d), (d, d), (f, d), (d, f))]

    def run() -> None:
        for _ in range(layers):
            torch.nn.functional.linear(x, weights[0])
            torch.nn.functional.linear(x, weights[1])
            torch.nn.functional.linear(x, weights[2])
            torch.nn.functional.linear(h, weights[3])

    ms = timed(run)
    flops = 2 * tokens * layers * sum(n * k for n, k in ((3 * d, d), (d, d), (f, d), (d, f)))
    return {"ms": ms, "tflops": flops / ms / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qa = build(args.size)
    model = qa.loaded.model
    pixels = torch.randn(args.frames, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    result: dict[str, Any] = {"size": args.size, "frames": args.frames, "gpu": torch.cuda.get_device_name()}

    def encode() -> None:
        with torch.inference_mode():
            encode_frames(model, pixels, 196)

    def transformers_way() -> None:
        with torch.inference_mode():
            model.model.get_video_features(
                pixels.unsqueeze(0), vision_feature_layer=-1, vision_feature_select_strategy="full"
            )

    with torch.inference_mode():
        ours = encode_frames(model, pixels, 196)[0]
        out = model.model.get_video_features(
            pixels.unsqueeze(0), vision_feature_layer=-1, vision_feature_select_strategy="full"
        )
    reference = out.pooler_output.reshape(-1, ours.shape[-1])[: ours.shape[0]]
    result["equal_to_get_video_features"] = bool(torch.equal(ours, reference))
    result["get_video_features_ms"] = timed(transformers_way)
    print("get_video_features", result["get_video_features_ms"], "equal", result["equal_to_get_video_features"])

    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    for label, backend in backends.items():
        try:
            if backend is None:
                result[f"encode_ms_{label}"] = timed(encode)
            else:
                with sdpa_kernel([backend]):
                    result[f"encode_ms_{label}"] = timed(encode)
        except RuntimeError as error:  # a back end that does not take these shapes
            result[f"encode_ms_{label}"] = f"error: {str(error).splitlines()[0][:200]}"
        print(label, result[f"encode_ms_{label}"], flush=True)

    tower = model.model.vision_tower
    with torch.inference_mode():
        result["tower_ms"] = timed(lambda: tower(pixels, output_hidden_states=True))
    result["gemm_floor"] = gemm_floor(model.config.vision_config, args.frames)
    print("tower", result["tower_ms"], "gemms alone", result["gemm_floor"], flush=True)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        encode()
        torch.cuda.synchronize()
    by_family: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = event.device_time_total
        if us <= 0:
            continue
        by_family[kernel_family(event.key, FAMILIES)] += us / 1000
        kernels.append((us / 1000, event.count, event.key[:110]))
    result["kernel_ms_by_family"] = dict(sorted(by_family.items(), key=lambda kv: -kv[1]))
    result["top_kernels"] = [
        {"ms": round(ms, 3), "calls": n, "name": name} for ms, n, name in sorted(kernels, reverse=True)[:15]
    ]
    print(json.dumps(result["kernel_ms_by_family"], indent=1), flush=True)

    if args.compile:
        compiled = torch.compile(tower, dynamic=False)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(pixels, output_hidden_states=True)
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            result["tower_ms_compiled"] = timed(lambda: compiled(pixels, output_hidden_states=True))
        print("compiled tower", result["tower_ms_compiled"], "compile", result["compile_s"], flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
