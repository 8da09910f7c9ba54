"""Where a batch job's wall time goes, full vs DyCoke at their own batch sizes (random weights, CUDA).

    python benchmarks/profile_batch.py --runs full:30 dycoke:62 --out benchmarks/results/batch-profile.json

Each ``method:batch`` runs ``dycoke batch``'s loop (``run_batch``, shared prefix) over ``--videos``
videos with two full batches each, after one untimed warm-up run, and times its stages with the GPU
synchronised at each boundary: video preparation (decode wait, preprocess, vision encoder),
compression, the shared prefix's prefill, generation (per batch: the expanded prefix, the questions'
prefill, the decode steps), the reports and the records written. ``other`` is what none of them holds.
Timing wraps the library's functions from this script only (a profiling tool, not the product's path).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_batch import method_options, write_questions
from benchmarks.bench_methods import build, environment
from dycoke import pipeline
from dycoke.config import GenerationOptions, RunOptions, VideoOptions
from dycoke.runs.batch import read_questions, run_batch
from dycoke.runs.results import ResultWriter


@dataclass
class Tracing:
    """What ``--trace`` / ``--trace-decode`` ask of the current run, and the table each found (once)."""

    prefill: bool = False
    decode: bool = False
    prefill_table: str = ""
    decode_table: str = ""

    def start(self, *, prefill: bool, decode: bool) -> None:
        """A new run: what it traces, nothing found yet."""
        self.prefill, self.decode, self.prefill_table, self.decode_table = prefill, decode, "", ""


TRACE = Tracing()
STAGES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(stage: str) -> Iterator[None]:
    synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        synchronize()
        STAGES[stage] += time.perf_counter() - t0
        COUNTS[stage] += 1


def traced(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One questions' prefill under torch's profiler (``--trace``): its top operators by GPU and by host
    time, kept for the output."""
    with timed("    model forward (questions' prefill)"), torch.profiler.profile() as prof:
        out = forward(*args, **kwargs)
        synchronize()
    averages = prof.key_averages()
    TRACE.prefill_table = "\n".join(
        averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
        for key in ("self_cuda_time_total", "self_cpu_time_total")
    )
    return out


def wrap(owner: Any, name: str, stage: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def timed_call(*args: Any, **kwargs: Any) -> Any:
        with timed(stage):
            return original(*args, **kwargs)

    setattr(owner, name, timed_call)


def instrument() -> None:
    wrap(pipeline.VideoQA, "prepare", "prepare (preprocess + vision encoder)")
    wrap(pipeline.VideoQA, "compress", "compress")
    wrap(pipeline, "prefill_prefix", "prefix prefill")
    wrap(pipeline.VideoQA, "_generate", "generate (expand + prefill + decode)")
    wrap(pipeline.VideoQA, "_report", "reports")
    wrap(ResultWriter, "write", "records written")
    wrap_decode_loop()
    reader = pipeline.decode_video

    @functools.wraps(reader)
    def timed_reader(*args: Any, **kwargs: Any) -> Any:  # on the reader thread: no GPU synchronisation
        t0 = time.perf_counter()
        try:
            return reader(*args, **kwargs)
        finally:
            STAGES["video decode (reader thread, overlaps)"] += time.perf_counter() - t0

    pipeline.decode_video = timed_reader


def wrap_decode_loop() -> None:
    """Split generation into its prefill (expanded prefix + the questions' tokens) and decode steps,
    and the prefill into the prefix's expansion, the model's forward and the first decode step (the
    CUDA graph's capture)."""
    import dycoke.decoding as decoding
    from dycoke.decoding.static import StaticGreedyDecoder

    wrap(decoding, "expand_prefix", "    expand prefix")
    first_step = StaticGreedyDecoder._step

    def timed_step(self: StaticGreedyDecoder, first: bool) -> None:
        if not first:
            return first_step(self, first)
        with timed("    first decode step (capture)"):
            return first_step(self, first)

    StaticGreedyDecoder._step = timed_step  # type: ignore[method-assign]
    original_generate = StaticGreedyDecoder.generate

    def timed_generate(self: StaticGreedyDecoder, *args: Any, **kwargs: Any) -> Any:
        forward = self.model.forward

        def timed_forward(*a: Any, **k: Any) -> Any:
            if TRACE.prefill and not TRACE.prefill_table:
                return traced(forward, *a, **k)
            with timed("    model forward (questions' prefill)"):
                return forward(*a, **k)

        self.model.forward = timed_forward
        try:
            return original_generate(self, *args, **kwargs)
        finally:
            del self.model.forward

    StaticGreedyDecoder.generate = timed_generate  # type: ignore[method-assign]
    original = pipeline.decode

    @functools.wraps(original)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if TRACE.decode and not TRACE.decode_table:  # --trace-decode: this batch's GPU kernels
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                output, timing = original(*args, **kwargs)
                synchronize()
            TRACE.decode_table = prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90
            )
        else:
            output, timing = original(*args, **kwargs)
        STAGES["  of which prefill (expand + questions)"] += timing.prefill
        STAGES["  of which decode steps"] += timing.decode
        return output, timing

    pipeline.decode = recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--video", type=Path, default=Path("samples/bigbuckbunny.mp4"))
    parser.add_argument("--runs", nargs="+", default=["full:30", "dycoke:62"], help="method:batch_size")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--trace", action="store_true", help="profile each method's first timed prefill")
    parser.add_argument(
        "--trace-decode", action="store_true", help="list the GPU kernels of each method's first timed batch"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    qa = build(args.size, args.device)
    instrument()
    result: dict[str, Any] = {
        **environment(args.device),
        "frames": args.frames,
        "new_tokens": args.new_tokens,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for spec in args.runs:
            method, size = spec.split(":")
            batch = int(size)
            chosen, prefill_rows = method_options(method)
            generation = GenerationOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
            if prefill_rows is not None:
                generation = replace(generation, prefill_rows=prefill_rows)
            options = RunOptions(video=VideoOptions(num_frames=args.frames), generation=generation, method=chosen)
            (folder / method).mkdir()
            questions = read_questions(write_questions(folder / method, args.video, args.videos, 2 * batch))
            for attempt in ("warm-up", "timed"):
                timed_run = attempt == "timed"
                TRACE.start(prefill=args.trace and timed_run, decode=args.trace_decode and timed_run)
                STAGES.clear()
                COUNTS.clear()
                synchronize()
                t0 = time.perf_counter()
                with ResultWriter(folder / f"{method}.jsonl", overwrite=True) as writer:
                    run_batch(qa, questions, options, [options.method.method], writer, batch_size=batch)
                synchronize()
                wall = time.perf_counter() - t0
            main_thread = sum(v for k, v in STAGES.items() if not k.startswith(("video decode", " ")))
            row = {
                "method": method,
                "batch": batch,
                "questions": len(questions),
                "wall_s": wall,
                "questions_per_s": len(questions) / wall,
                "stages_s": dict(STAGES),
                "calls": dict(COUNTS),
                "other_s": wall - main_thread,
            }
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if TRACE.prefill_table:
                print(f"{method}, batch {batch}: one questions' prefill\n{TRACE.prefill_table}", flush=True)
            if TRACE.decode_table:
                print(f"{method}, batch {batch}: one batch's generation, GPU\n{TRACE.decode_table}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
