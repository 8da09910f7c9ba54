"""Where a warm answer's decode time goes, step by step, on a random-weight model at the real shape (CUDA).

    python benchmarks/profile_answer_steps.py --out benchmarks/results/answer-steps-h200.json

For each frame count and method, in one process: a first answer (untimed; another question, so another
cache length, as a user's next question has), then an answer whose decode steps are each timed with the
GPU synchronised around them (``step1_ms``: the first step, which captures the CUDA graph and replays it
unless the method compacts after it; ``step2_ms``; ``steady_ms``: the median of the rest), then the
same answer untimed (``wall``, its report's ``prefill``, ``decode``, ``ms_per_token``), and the GPU time
per decode step by kernel family (two eager profiled answers, 34 and 2 tokens: their difference over
32 steps). Last, three follow-up questions on a prepared video with its prefix cached, as the server
answers them, and a profile of one such follow-up's prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build
from benchmarks.profile_step import kernel_times, per_step
from dycoke.config import run_options
from dycoke.decoding import static


def kernel_families(qa: Any, prepared: Any, frames: int, method: str) -> dict[str, Any]:
    """GPU milliseconds per decode step, by family and by kernel (top 16), of the eager static decoder."""
    profiles = []
    for tokens in (34, 2):
        options = run_options(
            num_frames=frames, method=method, max_new_tokens=tokens, min_new_tokens=tokens, decoder="static"
        )
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            qa.answer(prepared, "What is the rabbit doing now?", options)
        profiles.append(kernel_times(prof))
    families, top = per_step(profiles[0], profiles[1], most=16)
    return {
        "families_ms_per_step": {k: round(v, 4) for k, v in families.items()},
        "top": [(round(ms, 4), calls, name) for ms, calls, name in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--methods", nargs="+", default=["full", "dycoke"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    qa = build("7b")
    result: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "gpu": torch.cuda.get_device_name()}
    step = static.StaticGreedyDecoder._step
    times: list[float] = []

    def timed_step(self: static.StaticGreedyDecoder, first: bool) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(self, first)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    prepared = {frames: qa.prepare(args.video, run_options(num_frames=frames).video) for frames in args.frames}
    for frames in args.frames:
        for method in args.methods:
            options = run_options(num_frames=frames, method=method, max_new_tokens=64, min_new_tokens=64)
            qa.answer(prepared[frames], "What is the rabbit doing?", options)
            static.StaticGreedyDecoder._step = timed_step  # type: ignore[method-assign]
            times.clear()
            t0 = time.perf_counter()
            qa.answer(prepared[frames], "What is the rabbit doing now?", options)
            synced_wall = time.perf_counter() - t0
            static.StaticGreedyDecoder._step = step  # type: ignore[method-assign]
            t0 = time.perf_counter()
            report = qa.answer(prepared[frames], "What is the rabbit doing now?", options)
            row = {
                "step1_ms": 1000 * times[0],
                "step2_ms": 1000 * times[1],
                "steady_ms": 1000 * statistics.median(times[2:]),
                "wall_synced": synced_wall,
                "wall": time.perf_counter() - t0,
                "prefill": report.timings_s.prefill,
                "decode": report.timings_s.decode,
                "ms_per_token": report.timings_s.ms_per_token,
                **kernel_families(qa, prepared[frames], frames, method),
            }
            result[f"{method}-{frames}"] = row
            print(method, frames, json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    options = run_options(num_frames=32, method="dycoke", max_new_tokens=64, min_new_tokens=64)
    video = qa.prepare(args.video, options.video)
    qa.answer_many(video, ["What is the rabbit doing?"], options)  # the prefix, memoised on the video
    qa.answer_many(video, ["And then what?"], options)
    follow_ups = []
    for question in ("What happens next?", "Is it sunny?", "What colour is the rabbit?"):
        t0 = time.perf_counter()
        report = qa.answer_many(video, [question], options)[0]
        timings = report.timings_s
        follow_ups.append(
            {
                "wall": time.perf_counter() - t0,
                "prefill": timings.prefill,
                "decode": timings.decode,
                "compress": timings.compress,
            }
        )
    result["follow_up"] = follow_ups
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        qa.answer_many(video, ["Where is the bird?"], run_options(options, max_new_tokens=1, min_new_tokens=1))
    result["follow_up_prefill_profile"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    print(json.dumps(follow_ups), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
