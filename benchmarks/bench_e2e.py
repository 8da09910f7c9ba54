"""End to end, from a video file on disk to the 64th answer token: the plain transformers way vs dycoke.

Run on a CUDA machine with torchvision (transformers' video processor needs it); random weights at the
real shapes, bf16, 64 forced new tokens:

    python benchmarks/bench_e2e.py --sizes 7b 0.5b --frames 16 32 64 --repeats 3 \
        --video samples/bigbuckbunny.mp4 --out benchmarks/results/e2e-h100

Contenders, side by side in one process, alternating run by run after a warm-up each:

- ``hf-plain``: what a user writes with transformers alone: decord reads the sampled frames at full size,
  ``LlavaOnevisionVideoProcessor`` (on the CPU, its default) prepares them, ``model.generate`` answers
  with ``pixel_values_videos`` and every visual token.
- ``full``, ``dycoke``, ``fastv``, ``prumerge``: ``VideoQA.ask`` with that method (default decoder:
  CUDA graphs, except FastV which uses ``generate``).
- ``dycoke-torch-dp``: DyCoke with its decode-time pruning in torch operations (``DYCOKE_DP_KERNELS=0``)
  instead of its Triton kernels; ``dycoke-prune-every-step``: DyCoke with a gate threshold of 1, so that
  DP prunes at (nearly) every step (a random-weight model's attention barely moves from step to step, so
  at the paper's 0.9 it prunes at the first step only).
- any of those with ``-streamed`` (``full-streamed``, ...): with ``DYCOKE_STREAM_VIDEO=1``, the frames
  encoded (and the shared prefix prefilled) while a forked child decodes the rest
  (``dycoke.stream_encode``, ``dycoke.stream_prefill``) instead of after the whole video is decoded.

Writes ``<out>.json`` (every run), ``<out>.md`` (medians) and ``<out>.png`` (a chart of the medians).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build, environment, median_of, run_once
from dycoke.config import GenerationOptions, MethodOptions, RunOptions, VideoOptions
from dycoke.decoding.dp_kernels import DP_KERNELS_ENV
from dycoke.decoding.streaming import TimedTextStreamer
from dycoke.pipeline import STREAM_VIDEO_ENV, VideoQA
from dycoke.prompt import paper_prompt

STREAMED = "-streamed"
QUESTION = "What is the rabbit doing, and what happens to the butterflies?"


def hf_plain(qa: VideoQA, video: str, frames: int, new_tokens: int, processor: Any) -> dict[str, Any]:
    """The plain transformers way, timed stage by stage."""
    import decord

    loaded = qa.loaded
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    reader = decord.VideoReader(video)
    indices = np.linspace(0, len(reader) - 1, frames, dtype=int)
    clip = reader.get_batch(indices.tolist()).asnumpy()
    t1 = time.perf_counter()
    pixels = processor(videos=[clip], return_tensors="pt")["pixel_values_videos"].to("cuda", torch.bfloat16)
    t2 = time.perf_counter()
    text = paper_prompt(QUESTION, "You are a helpful assistant.").replace("<video>", "<video>" * (frames * 196 + 1))
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to("cuda")
    streamer = TimedTextStreamer(loaded.tokenizer)
    streamer.start()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=streamer,
        )
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    generated = out.shape[1] - ids.shape[1]
    prefill = streamer.first_token_s or 0.0
    return {
        "video_decode_ms": 1000 * (t1 - t0),
        "preprocess_ms": 1000 * (t2 - t1),
        "vision_encoder_ms": None,  # inside generate's prefill
        "compress_ms": None,
        "prefill_ms": 1000 * prefill,
        "ttft_ms": 1000 * (t2 - t0 + prefill),
        "ms_per_token": 1000 * streamer.decode_s / max(generated - 1, 1),
        "total_ms": 1000 * (t3 - t0),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "kv_cache_mib": None,
        "visual_tokens": frames * 196 + 1,
        "prompt_tokens": int(ids.shape[1]),
        "generated": int(generated),
        "pruned_step_share": None,
        "tflops_paper": None,
    }


def one(qa: VideoQA, name: str, frames: int, args: argparse.Namespace, processor: Any) -> dict[str, Any]:
    """One timed run of one contender."""
    if name == "hf-plain":
        return hf_plain(qa, args.video, frames, args.new_tokens, processor)
    if name.endswith(STREAMED):
        os.environ[STREAM_VIDEO_ENV] = "1"
        try:
            return one(qa, name.removesuffix(STREAMED), frames, args, processor)
        finally:
            del os.environ[STREAM_VIDEO_ENV]
    method = {
        "dycoke-torch-dp": MethodOptions(method="dycoke"),
        "dycoke-prune-every-step": MethodOptions(method="dycoke", gate_threshold=1.0),
    }.get(name) or MethodOptions(method=name)  # type: ignore[arg-type]
    options = RunOptions(
        video=VideoOptions(num_frames=frames),
        generation=GenerationOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
        method=method,
    )
    if name != "dycoke-torch-dp":
        return run_once(qa, args.video, options)
    os.environ[DP_KERNELS_ENV] = "0"
    try:
        return run_once(qa, args.video, options)
    finally:
        del os.environ[DP_KERNELS_ENV]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["7b", "0.5b"])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--contenders", nargs="+", default=["hf-plain", "full", "dycoke", "fastv", "prumerge"])
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    args = parser.parse_args()

    from transformers import LlavaOnevisionVideoProcessor

    processor = LlavaOnevisionVideoProcessor()
    results: dict[str, Any] = {
        **environment(),
        "new_tokens": args.new_tokens,
        "rows": [],
    }
    for size in args.sizes:
        qa = build(size)
        for frames in args.frames:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.contenders}
            for name in args.contenders:
                one(qa, name, frames, args, processor)  # warm-up
            for _ in range(args.repeats):
                for name in args.contenders:
                    runs[name].append(one(qa, name, frames, args, processor))
            for name in args.contenders:
                row = {"size": size, "frames": frames, "contender": name, **median_of(runs[name])}
                row["total_ms_all"] = [r["total_ms"] for r in runs[name]]
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
        del qa
        torch.cuda.empty_cache()
        save(results, args.out)  # after every model, so a cut-short run keeps what it measured
    print(markdown(results))


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    chart(results, out.with_suffix(".png"))


def fmt(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['gpu']}, torch {results['torch']}, transformers {results['transformers']}, "
        f"{results['new_tokens']} new tokens, medians. Command: `{results['command']}`",
        "",
        "| model | frames | contender | video decode | preprocess | prefill | TTFT | ms/token | end to end | speed-up "
        "| peak GiB | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["size"], r["frames"]): r["total_ms"] for r in results["rows"] if r["contender"] == "hf-plain"}
    for r in results["rows"]:
        plain = base.get((r["size"], r["frames"]))
        speedup = f"{plain / r['total_ms']:.2f}x" if plain else "-"
        lines.append(
            f"| {r['size']} | {r['frames']} | {r['contender']} | {fmt(r['video_decode_ms'])} ms | "
            f"{fmt(r['preprocess_ms'])} ms | {fmt(r['prefill_ms'])} ms | {fmt(r['ttft_ms'])} ms | "
            f"{fmt(r['ms_per_token'], 1)} | {fmt(r['total_ms'])} ms | {speedup} | {fmt(r['peak_gpu_gib'], 1)} | "
            f"{fmt(r['kv_cache_mib'])} |"
        )
    return "\n".join(lines)


def chart_frames(counts: list[int]) -> int:
    """The frame count the chart shows: the largest up to 32, else the smallest run."""
    small = [n for n in counts if n <= 32]
    return max(small) if small else min(counts)


def chart(results: dict[str, Any], path: Path) -> None:
    """End-to-end time per contender (stacked: up to the first token, then decoding), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in results["rows"]))
    frames = chart_frames([r["frames"] for r in results["rows"]])
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        rows = [r for r in results["rows"] if r["size"] == size and r["frames"] == frames]
        names = [r["contender"] for r in rows]
        ttft = [r["ttft_ms"] / 1000 for r in rows]
        rest = [(r["total_ms"] - r["ttft_ms"]) / 1000 for r in rows]
        ax.bar(names, ttft, label="to first token")
        ax.bar(names, rest, bottom=ttft, label=f"{results['new_tokens'] - 1} more tokens")
        for i, r in enumerate(rows):
            ax.text(i, r["total_ms"] / 1000, f"{r['total_ms'] / 1000:.2f} s", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"LLaVA-OV {size.upper()} shapes, {frames} frames, {results['gpu']}")
        ax.set_ylabel("seconds, video file to last token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
