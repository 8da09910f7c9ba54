"""Batch throughput: 8 videos x 8 questions, one by one vs shared work, full vs DyCoke.

Run on a CUDA machine with a random-weight model at a real shape (answers are meaningless, so every
answer is forced to ``--new-tokens`` tokens and all modes do the same work):

    python benchmarks/bench_batch.py --size 7b --frames 32 --new-tokens 16 \
        --video samples/bigbuckbunny.mp4 --out benchmarks/results/batch-7b.json

Modes, each over the same 64 questions:

- ``one-by-one``: ``VideoQA.ask`` per question (decode, encode, compress, prefill every time): what a
  loop over ``dycoke ask`` does without the process start-up.
- ``per-video``: ``dycoke batch --no-share-prefix``: one decode + encode per video, full prefill per
  question.
- ``shared``: ``dycoke batch``: plus the system prompt + video prefilled once per video.
- ``shared-b8``: ``dycoke batch --batch-size 8``: plus the 8 questions of a video generated together.

Questions per second counts the wall time of the whole mode (the next video's decode overlaps on a CPU
thread in the batch modes).

``--memory-budget-gib G``: for each method, the largest batch size whose peak GPU memory (weights
included) stays within G GiB is searched (doubling, then bisecting; a batch that runs out of memory
does not fit), each trial answering one video's questions in one batch; then the ``shared-b<best>``
mode runs over every video and the result records questions per second at that budget
(``budget`` rows), the quantity DyCoke's smaller KV cache buys. ``dycoke-evict`` (``--dp-evict``, a
deviation) prefills a batch 16 rows at a time, each group's cache evicted before the next;
``dycoke-evict@N`` takes N rows a group (0: the whole batch at once, the peak of the evicting batch's
whole cache). A fixed question count leaves each
video a partly filled last batch (96 questions: full's 30 a batch run 30+30+30+6, DyCoke's 62 run
62+34), so each row also has ``full_batches``: two full batches per video, the rate of a long job:

    python benchmarks/bench_batch.py --size 7b --frames 32 --new-tokens 64 --memory-budget-gib 40 \
        --questions-per-video 64 --modes --out benchmarks/results/batch-budget-7b-h200.json
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build, environment
from benchmarks.bench_methods import method_options as spec_options
from dycoke.config import GenerationOptions, MethodOptions, RunOptions, VideoOptions
from dycoke.pipeline import VideoQA
from dycoke.runs.batch import read_questions, run_batch
from dycoke.runs.results import ResultWriter

QUESTIONS = [
    "What animal is in the video?",
    "What colour is the sky?",
    "Describe what happens from the beginning to the end of the clip in a few sentences.",
    "How many butterflies appear?",
    "Is it day or night?",
    "What does the rabbit do after it leaves its burrow, and how do the other animals react?",
    "Where does the scene take place?",
    "What is stationary?",
]
MODES: dict[str, dict[str, Any] | None] = {
    "one-by-one": None,
    "per-video": {"share_prefix": False, "batch_size": 1},
    "shared": {"share_prefix": True, "batch_size": 1},
    "shared-b8": {"share_prefix": True, "batch_size": 8},
}


def write_questions(folder: Path, video: Path, videos: int, per_video: int = len(QUESTIONS)) -> Path:
    rows = ["id,video,question"]
    texts = [
        QUESTIONS[i % len(QUESTIONS)] + (f" ({i + 1})" if per_video > len(QUESTIONS) else "") for i in range(per_video)
    ]
    for v in range(videos):
        shutil.copy(video, folder / f"video{v}.mp4")
        rows += [f'v{v}-q{q},video{v}.mp4,"{text}"' for q, text in enumerate(texts)]
    path = folder / "questions.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def method_options(name: str) -> tuple[MethodOptions, int | None]:
    """A method by name and the ``prefill_rows`` it asks for (None: the default). ``dycoke-evict``:
    DyCoke with ``--dp-evict`` (pruned visual entries removed from the later layers' caches after the
    first decode step: a deviation from the paper, opt-in); ``NAME@N``: with ``--prefill-rows N`` (0:
    the batch prefilled at once); ``dycoke:gate_threshold=1.0`` sets options as ``bench_methods.py``."""
    spec, _, rows = name.partition("@")
    if rows and not rows.isdigit():
        raise ValueError(f"unknown method {name!r}: @N takes a number of prefill rows")
    if spec == "dycoke-evict":
        spec = "dycoke:dp_evict=True"
    return spec_options(spec), int(rows) if rows else None


def mode_settings(mode: str) -> dict[str, Any] | None:
    """``run_batch`` keywords of a mode (None: one ``ask`` per question); ``shared-b<N>`` for any N."""
    if mode in MODES:
        return MODES[mode]
    if mode.startswith("shared-b") and mode[len("shared-b") :].isdigit():
        return {"share_prefix": True, "batch_size": int(mode[len("shared-b") :])}
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)} or shared-b<N>")


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in 1..limit with ``fits(n)``, assuming fitting is monotone (what fits at n fits
    below it): doubling from 1, then bisecting. 0 when even 1 does not fit. Calls ``fits`` about
    2 log2(n) times."""
    if limit < 1 or not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)  # low fits; high does not (or is past the limit)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def batch_fits(qa: VideoQA, csv_path: Path, options: RunOptions, folder: Path, size: int, *, budget_gib: float) -> bool:
    """Whether ``size`` questions on one video, answered as one batch, peak within ``budget_gib``."""
    questions = read_questions(csv_path)[:size]
    trial = folder / f"trial-{size}.csv"
    with trial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "video", "question"])
        writer.writerows([q.id, str(q.path), q.question] for q in questions)
    try:
        peak = run_mode(qa, trial, f"shared-b{size}", options, folder)["peak_gpu_gib"]
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return False
    except Exception as exc:  # the library turns an out-of-memory error into its own
        if "out of" not in str(exc).lower() or "memory" not in str(exc).lower():
            raise
        torch.cuda.empty_cache()
        return False
    print(f"  batch {size}: peak {peak:.1f} GiB", flush=True)
    return bool(peak <= budget_gib)


def run_mode(qa: VideoQA, csv_path: Path, mode: str, options: RunOptions, folder: Path) -> dict[str, Any]:
    questions = read_questions(csv_path)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    kwargs = mode_settings(mode)
    if kwargs is None:
        for q in questions:
            qa.ask(q.path, q.prompt(), options)
    else:
        with ResultWriter(folder / f"{mode}.jsonl", overwrite=True) as writer:
            summary = run_batch(qa, questions, options, [options.method.method], writer, **kwargs)
        assert summary.failed == 0 and summary.answered == len(questions)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {
        "questions": len(questions),
        "seconds": seconds,
        "questions_per_s": len(questions) / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    if kwargs is not None:
        row["pruned_step_share"] = mean_pruned_share(folder / f"{mode}.jsonl")
    return row


def mean_pruned_share(records: Path) -> float | None:
    """The mean over a run's records of DP's ``pruned_step_share`` (the decode steps whose later layers
    attended to the kept visual tokens only), None for a method without DP: with random weights the
    paper's gate prunes the first step only, so this says whether a run measured DP's reads at all."""
    shares = [
        record["compression"]["pruned_step_share"]
        for record in map(json.loads, records.read_text().splitlines())
        if (record.get("compression") or {}).get("pruned_step_share") is not None
    ]
    return sum(shares) / len(shares) if shares else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--questions-per-video", type=int, default=len(QUESTIONS))
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--methods", nargs="+", default=["full", "dycoke"])
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument(
        "--batch-sizes", type=int, nargs="*", default=[], help="add shared-prefix modes at these batch sizes"
    )
    parser.add_argument("--decoder", default="auto", help="decode loop: auto (CUDA graphs), hf, static, graph")
    parser.add_argument(
        "--memory-budget-gib", type=float, help="find each method's largest batch within this peak GPU memory"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for size in args.batch_sizes:
        if f"shared-b{size}" not in args.modes:
            args.modes.append(f"shared-b{size}")

    results: dict[str, Any] = {
        **environment(),
        "size": args.size,
        "frames": args.frames,
        "new_tokens": args.new_tokens,
        "videos": args.videos,
        "decoder": args.decoder,
        "questions_per_video": args.questions_per_video,
        "runs": [],
    }
    qa = build(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = write_questions(folder, Path(args.video), args.videos, args.questions_per_video)
        (folder / "warm").mkdir()
        warm = write_questions(folder / "warm", Path(args.video), 1, args.questions_per_video)
        for method in args.methods:
            chosen, prefill_rows = method_options(method)
            generation = GenerationOptions(
                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, decoder=args.decoder
            )
            if prefill_rows is not None:
                generation = replace(generation, prefill_rows=prefill_rows)
            options = RunOptions(video=VideoOptions(num_frames=args.frames), generation=generation, method=chosen)
            for mode in args.modes:
                run_mode(qa, warm, mode, options, folder)  # warm-up: kernels, allocator, file cache
                row = {"method": method, "mode": mode, **run_mode(qa, csv_path, mode, options, folder)}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
            if args.memory_budget_gib is not None:
                budget = float(args.memory_budget_gib)
                best = largest_fitting(
                    partial(batch_fits, qa, csv_path, options, folder, budget_gib=budget),
                    args.questions_per_video,
                )
                row = {"method": method, "mode": f"shared-b{best}", "budget_gib": budget, "largest_batch": best}
                if best:
                    row |= run_mode(qa, csv_path, f"shared-b{best}", options, folder)
                    # the same batch size with every batch full: the rate a long job runs at, without the
                    # partly filled last batch per video that a fixed question count leaves
                    (folder / "full-batches").mkdir(exist_ok=True)
                    full_csv = write_questions(folder / "full-batches", Path(args.video), args.videos, 2 * best)
                    steady = run_mode(qa, full_csv, f"shared-b{best}", options, folder)
                    row["full_batches"] = {"questions_per_video": 2 * best, **steady}
                print(json.dumps(row), flush=True)
                results.setdefault("budget", []).append(row)
    budget_rows = {r["method"]: r for r in results.get("budget", [])}
    if "full" in budget_rows and budget_rows["full"].get("questions_per_s"):
        for row in budget_rows.values():
            if row.get("questions_per_s"):
                row["vs_full_at_budget"] = row["questions_per_s"] / budget_rows["full"]["questions_per_s"]
            if "full_batches" in row and "full_batches" in budget_rows["full"]:
                full_rate = budget_rows["full"]["full_batches"]["questions_per_s"]
                row["full_batches"]["vs_full_at_budget"] = row["full_batches"]["questions_per_s"] / full_rate
    base = {r["method"]: r["questions_per_s"] for r in results["runs"] if r["mode"] == "one-by-one"}
    for row in results["runs"]:
        if row["method"] in base:
            row["speedup_vs_one_by_one"] = row["questions_per_s"] / base[row["method"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"{results['size']}, {results['frames']} frames, {results['new_tokens']} new tokens, "
        f"{results['videos']} videos x {results['questions_per_video']} questions, {results['gpu']}",
        "",
        "| method | mode | questions/s | seconds | speed-up | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        speedup = r.get("speedup_vs_one_by_one")
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['questions_per_s']:.2f} | {r['seconds']:.1f} | "
            f"{'-' if speedup is None else f'{speedup:.2f}x'} | {r['peak_gpu_gib']:.1f} |"
        )
    if results.get("budget"):
        lines += [
            "",
            "| method | budget GiB | largest batch | questions/s | vs full | full batches: questions/s | vs full "
            "| peak GiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["budget"]:
            ratio = r.get("vs_full_at_budget")
            steady = r.get("full_batches", {})
            steady_ratio = steady.get("vs_full_at_budget")
            lines.append(
                f"| {r['method']} | {r['budget_gib']:g} | {r['largest_batch']} | {r.get('questions_per_s', 0):.2f} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {steady.get('questions_per_s', 0):.2f} | "
                f"{'-' if steady_ratio is None else f'{steady_ratio:.2f}x'} | {r.get('peak_gpu_gib', 0):.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
