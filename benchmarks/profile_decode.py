"""Profile decode steps of full vs DyCoke on a random-weight model at a real shape (CUDA).

    python benchmarks/profile_decode.py --size 7b --frames 32

Prints, per method, the wall time per decode step (CUDA-synchronised, median of 5 runs of 16 tokens)
and the top CUDA kernels of one profiled run, to see where a decode step's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build, method_options
from dycoke.methods import build_method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=["full", "dycoke", "dycoke:gate_threshold=1.0"])
    args = parser.parse_args()
    qa = build(args.size)
    loaded = qa.loaded
    n_visual = args.frames * 196 + 1
    dim = loaded.text_config.hidden_size
    for spec in args.methods:
        options = method_options(spec)
        visual = n_visual if options.method == "full" else 3099
        embeds = torch.randn(1, visual + 60, dim, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(1, visual + 60, dtype=torch.long, device="cuda")

        def generate(options=options, embeds=embeds, mask=mask, visual=visual) -> None:
            method = build_method(options, loaded.model, loaded.num_layers)
            with torch.inference_mode(), method.decoding(visual_start=14, num_visual=visual):
                loaded.model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    max_new_tokens=args.tokens,
                    min_new_tokens=args.tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        def one_token(options=options, embeds=embeds, mask=mask, visual=visual) -> None:
            method = build_method(options, loaded.model, loaded.num_layers)
            with torch.inference_mode(), method.decoding(visual_start=14, num_visual=visual):
                loaded.model.generate(
                    inputs_embeds=embeds, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0
                )

        generate()
        steps, prefill = [], []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            one_token()
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            generate()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            prefill.append(t1 - t0)
            steps.append(((t2 - t1) - (t1 - t0)) / (args.tokens - 1))
        print(
            f"{spec}: {1000 * statistics.median(steps):.2f} ms/step, prefill {1000 * statistics.median(prefill):.1f} ms"
        )
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            generate()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
