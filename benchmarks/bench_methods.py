"""Full tokens vs DyCoke, side by side in one process, on random-weight models at the real shapes.

Run on a CUDA machine (weights are random, so answers are meaningless; 64 tokens are forced):

    python benchmarks/bench_methods.py --sizes 0.5b 7b --frames 32 --new-tokens 64 \
        --video samples/bigbuckbunny.mp4 --out benchmarks/results/methods.json

Per model and method: one warm-up, then ``--repeats`` runs; medians of every stage of the report
(video decode, preprocessing, vision encoder, TTM, prefill, time to first token, ms per decoded token,
total), peak GPU memory and KV-cache bytes; every run's ms/token and prefill are kept too. Methods
alternate run by run so drifts hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.config import GenerationOptions, MethodOptions, RunOptions, VideoOptions
from dycoke.decoding.kernels import compile_in_background
from dycoke.model import LoadedModel
from dycoke.pipeline import VideoQA
from dycoke.preprocess import PreprocessConfig
from dycoke.tiny import build_tiny_tokenizer, real_shape_config

QUESTION = "What is the rabbit doing, and what happens to the butterflies?"


def build(size: str, device: str = "cuda") -> VideoQA:
    """A random-weight LLaVA-OneVision at the real shape of ``size``, built directly on the device
    (bf16 on a GPU, fp32 on a CPU, the dtypes ``--dtype auto`` picks); the fused step's kernels compile
    on a thread meanwhile, as ``load_model`` does."""
    from transformers import LlavaOnevisionForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = real_shape_config(size)  # type: ignore[arg-type]
    # the offline tokenizer's ids for <image>/<video> (the real vocabulary is larger, so they are valid)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_in_background(config.text_config, torch.device(device), dtype)  # as load_model: beside the build
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=PreprocessConfig(),
        source=f"random-{size}",
        device=torch.device(device),
        dtype=dtype,
        random_weights=True,
    )
    return VideoQA(loaded)


def run_once(qa: VideoQA, video: str, options: RunOptions) -> dict[str, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = qa.ask(video, QUESTION, options)
    wall = time.perf_counter() - started
    t = report.timings_s
    return {
        "video_decode_ms": 1000 * t.video_decode,
        "preprocess_ms": 1000 * t.preprocess,
        "vision_encoder_ms": 1000 * t.vision_encoder,
        "compress_ms": 1000 * t.compress,
        "prefill_ms": 1000 * t.prefill,
        "ttft_ms": 1000 * t.ttft,
        "ms_per_token": t.ms_per_token,
        "total_ms": 1000 * t.total,
        "ask_wall_ms": 1000 * wall,
        "encoded_while_reading": report.video.encoded_while_reading,
        "peak_gpu_gib": (report.memory.peak_gpu_bytes or 0) / 2**30,
        "kv_cache_mib": report.memory.kv_cache_bytes / 2**20,
        "visual_tokens": report.tokens.visual,
        "prompt_tokens": report.tokens.prompt,
        "generated": report.tokens.generated,
        "pruned_step_share": report.compression.get("pruned_step_share"),
        "tflops_paper": report.compression.get("tflops"),
        "evicted_wanted_back_step_share": report.compression.get("evicted_wanted_back_step_share"),
        "evicted_wanted_back_avg_tokens": report.compression.get("evicted_wanted_back_avg_tokens"),
    }


def forced_generation(decoder_spec: str, tokens: int) -> GenerationOptions:
    """Exactly ``tokens`` answer tokens on ``graph``, ``hf``, ...; ``graph:unfused``: without the fused
    step; ``graph:cublas``: the fused step with cuBLAS for its one-row projections (see ``run_spec``)."""
    decoder, _, variant = decoder_spec.partition(":")
    return GenerationOptions(
        max_new_tokens=tokens, min_new_tokens=tokens, decoder=decoder, fused_step=variant != "unfused"
    )


def run_spec(qa: VideoQA, video: str, options: RunOptions, decoder_spec: str) -> dict[str, Any]:
    """``run_once``, with ``DYCOKE_GEMV=cublas`` set for a ``:cublas`` decoder spec."""
    from dycoke.decoding.fused import GEMV_ENV

    if not decoder_spec.endswith(":cublas"):
        return run_once(qa, video, options)
    os.environ[GEMV_ENV] = "cublas"
    try:
        return run_once(qa, video, options)
    finally:
        del os.environ[GEMV_ENV]


def method_options(spec: str) -> MethodOptions:
    """``dycoke`` or ``dycoke:gate_threshold=1.0,prune_ratio=0.5`` -> MethodOptions."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        field_type = type(getattr(MethodOptions(), key))
        if field_type is bool:
            kwargs[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            kwargs[key] = value if field_type is str else field_type(value)
    return MethodOptions(method=name, **kwargs)  # type: ignore[arg-type]


def environment(device: str = "cuda") -> dict[str, Any]:
    """What every result file records first: the exact command, the hardware, the library versions."""
    import transformers

    return {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU only, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.5b", "7b"])
    parser.add_argument("--frames", type=int, nargs="+", default=[32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument(
        "--methods", nargs="+", default=["full", "dycoke"], help="e.g. full dycoke dycoke:gate_threshold=1.0"
    )
    parser.add_argument(
        "--decoders",
        nargs="+",
        default=["auto"],
        help="decode loops: hf, static, graph, auto; graph:unfused = the model's own modules each step; "
        "graph:cublas = the fused step with cuBLAS for its one-row projections",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    results: dict[str, Any] = {**environment(args.device), "runs": []}
    for size in args.sizes:
        qa = build(size, args.device)
        for frames in args.frames:
            names = [m if len(args.decoders) == 1 else f"{m}@{d}" for m in args.methods for d in args.decoders]
            per_method: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            specs = {(m if len(args.decoders) == 1 else f"{m}@{d}"): d for m in args.methods for d in args.decoders}
            opts = {
                (m if len(args.decoders) == 1 else f"{m}@{d}"): RunOptions(
                    video=VideoOptions(num_frames=frames),
                    generation=forced_generation(d, args.new_tokens),
                    method=method_options(m),
                )
                for m in args.methods
                for d in args.decoders
            }
            first = {m: run_spec(qa, args.video, opts[m], specs[m]) for m in names}  # warm-up: first use
            for _ in range(args.repeats):
                for m in names:
                    per_method[m].append(run_spec(qa, args.video, opts[m], specs[m]))
            for m in names:
                row = {"size": size, "frames": frames, "method": m, **median_of(per_method[m])}
                row["ms_per_token_all"] = [r["ms_per_token"] for r in per_method[m]]
                row["prefill_ms_all"] = [r["prefill_ms"] for r in per_method[m]]
                row["first_use_total_ms"] = first[m]["total_ms"]
                row["first_use_ms_per_token"] = first[m]["ms_per_token"]
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
        del qa
        if args.device == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    cols = [
        ("size", "model"),
        ("frames", "F"),
        ("method", "method"),
        ("visual_tokens", "visual tok"),
        ("vision_encoder_ms", "encoder ms"),
        ("compress_ms", "TTM ms"),
        ("prefill_ms", "prefill ms"),
        ("ttft_ms", "TTFT ms"),
        ("ms_per_token", "ms/token"),
        ("total_ms", "total ms"),
        ("first_use_total_ms", "first use ms"),
        ("peak_gpu_gib", "peak GiB"),
        ("kv_cache_mib", "KV MiB"),
    ]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in results["runs"]:
        cells = []
        for key, _ in cols:
            v = row[key]
            cells.append(f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
