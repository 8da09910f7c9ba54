"""What a user waits for: `dycoke ask` as a fresh process, from the command to the answer.

Writes random-weight checkpoints with the real 0.5B/7B shapes to disk (the on-disk format of a real
one), then, per size, runs `dycoke ask ... --json` as fresh processes several times, every method in
turn within each repeat, and records the wall clock measured from outside next to the report's own
breakdown (start-up, load, video decode, vision encoder, prefill, decode, wall). In the same run: the
floor, a bare `python -c "import torch, transformers"` (before the rows and once per repeat among
them), and the first vs second answer inside one process (then a question of another length).
Page cache warm by default; `--drop-caches` also runs with the page cache dropped where allowed;
`--prefetch on off` alternates runs with and without the weights read ahead (DYCOKE_PREFETCH_WEIGHTS).
Imports come from compiled bytecode, as after a pip install, unless `--bytecode as-found` (see --help).
`--environment declared` runs the children as a fresh install of dycoke would: packages installed here
that dycoke's dependencies do not pull in count as absent (`benchmarks/installed.py`).

    python benchmarks/bench_cold.py --sizes 7b 0.5b --methods full dycoke --repeats 3 \\
        --checkpoints /tmp/dycoke-ckpt --out benchmarks/results/cold-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_question_lengths import answers_in_turn  # noqa: E402
from benchmarks.bytecode import add_bytecode_argument, child_environment, describe  # noqa: E402
from benchmarks.installed import declared_closure, hiding_environment, undeclared_modules  # noqa: E402

QUESTION = "What is the rabbit doing?"
OTHER_QUESTION = "Describe everything the rabbit does, in order, and say what the other animals do."


CHILD_ENVIRONMENT: dict[str, str] = {}
"""Every child's environment, set once from ``--bytecode`` (``benchmarks/bytecode.py``); this process's
while empty."""


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall seconds of a fresh process (``env`` added to this one's environment), and its stdout
    (raises with its stderr when it fails)."""
    t0 = time.perf_counter()
    environment = {**(CHILD_ENVIRONMENT or os.environ), **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False, env=environment)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stdout


def report(
    entry: dict[str, Any], floor: float, size: str, cache: str, method: str, prefetch: str, runs: list[dict[str, Any]]
) -> None:
    """Medians of one configuration's fresh-process runs, into ``entry["rows"]`` and printed."""
    row: dict[str, Any] = {
        "cache": cache,
        "method": method,
        "prefetch": prefetch,
        "runs": runs,
        **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None},
    }
    row["cold_minus_floor_s"] = row["median_process_wall_s"] - floor
    entry.setdefault("rows", []).append(row)
    print(
        f"{size} {cache} {method} prefetch {prefetch}: process {row['median_process_wall_s']:.2f} s "
        f"(minus floor {row['cold_minus_floor_s']:.2f}), startup {row['median_startup']:.2f}, "
        f"load {row['median_load']:.2f}, answer {row['median_total']:.2f}",
        flush=True,
    )


def run_order(repeats: int, methods: list[str], prefetch: list[str]) -> list[tuple[str, str] | None]:
    """The timed runs in order: per repeat, a floor run (None), then every (method, prefetch) in turn,
    so that a drift of the machine during the run hits every configuration alike."""
    order: list[tuple[str, str] | None] = []
    for _ in range(repeats):
        order.append(None)
        order += [(method, setting) for method in methods for setting in prefetch]
    return order


def drop_caches() -> bool:
    """Drop the page cache (root on a machine that allows it); False where it is not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child_two_answers(model: str, video: str, method: str, new_tokens: int) -> None:
    """In one process: load, answer the same question twice, then another question (another prompt
    length: shapes the first two did not use); print the answers' seconds (from the file) and each
    one's stages as JSON."""
    answers = answers_in_turn(model, video, [QUESTION, QUESTION, OTHER_QUESTION], method, new_tokens)
    times = [answer.pop("wall_s") for answer in answers]
    print(json.dumps({"first_s": times[0], "second_s": times[1], "other_question_s": times[2], "stages": answers}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["7b", "0.5b"])
    parser.add_argument("--methods", nargs="+", default=["full", "dycoke"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder for the random checkpoints")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument(
        "--prefetch",
        nargs="+",
        choices=["on", "off"],
        default=["on"],
        help="weights read ahead during the model-code import (off: DYCOKE_PREFETCH_WEIGHTS=0); both alternate",
    )
    parser.add_argument(
        "--environment",
        choices=["as-found", "declared"],
        default="as-found",
        help="declared: children see only the distributions pip install of this project pulls in "
        "(benchmarks/installed.py); as-found: everything installed here",
    )
    parser.add_argument("--hide", nargs="*", default=[], help="modules the children see as not installed")
    add_bytecode_argument(parser)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.child:
        child_two_answers(args.child[0], args.video, args.child[1], int(args.child[2]))
        return

    import torch
    import transformers

    py = sys.executable
    CHILD_ENVIRONMENT.update(child_environment(args.bytecode, args.checkpoints / "pycache"))
    hidden = list(args.hide)
    if args.environment == "declared":
        hidden += undeclared_modules(declared_closure())
    if hidden:
        CHILD_ENVIRONMENT.update(hiding_environment(hidden, args.checkpoints / "hidden-modules"))
    result: dict[str, Any] = {
        **describe(args.bytecode),
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "environment": args.environment,
        "hidden_modules": sorted(set(hidden)),
        "floor_s": [],
        "sizes": [],
    }
    if args.bytecode == "cached":
        run([py, "-c", "import torch, transformers"])  # untimed: fills the bytecode cache
    for _ in range(args.repeats):
        result["floor_s"].append(run([py, "-c", "import torch, transformers"])[0])
    floor = statistics.median(result["floor_s"])
    save(args.out, result)
    print(f"floor (import torch, transformers): {floor:.2f} s", flush=True)

    from dycoke.tiny import build_real_shape_checkpoint

    for size in args.sizes:
        folder = args.checkpoints / f"random-{size}"
        t0 = time.perf_counter()
        if not (folder / "config.json").exists():
            build_real_shape_checkpoint(folder, size)  # type: ignore[arg-type]
            torch.cuda.empty_cache()
        # dirty pages written back before any timing, also for a checkpoint written just before this
        # script (their writeback slowed the first timed runs' imports)
        os.sync()
        if args.bytecode == "cached":  # untimed: compiles every module the timed runs import
            run([py, "-m", "cli.app", "ask", args.video, QUESTION, "--model", str(folder), "--max-new-tokens", "4"])
        size_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        entry: dict[str, Any] = {"size": size, "checkpoint_gb": size_bytes / 1e9, "write_s": time.perf_counter() - t0}
        result["sizes"].append(entry)  # saved after every row: a run cut short keeps what it measured
        for cache in ["warm", "dropped"] if args.drop_caches else ["warm"]:
            # every repeat runs every method and prefetch setting in turn, so that a drift of the machine
            # (the floor moved by 1.7 s between runs on the H200) hits them alike
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for step in run_order(args.repeats, args.methods, args.prefetch):
                if step is None:  # the floor drifts too
                    result["floor_s"].append(run([py, "-c", "import torch, transformers"])[0])
                    continue
                method, prefetch = step
                if cache == "dropped" and not drop_caches():
                    entry["drop_caches"] = "not allowed on this machine"
                    break
                command = [py, "-m", "cli.app", "ask", args.video, QUESTION, "--model", str(folder)]
                command += ["--method", method, "--json", "--max-new-tokens", str(args.new_tokens)]
                command += ["--min-new-tokens", str(args.new_tokens)]
                wall, out = run(command, {"DYCOKE_PREFETCH_WEIGHTS": "1" if prefetch == "on" else "0"})
                t = json.loads(out)["timings_s"]
                runs.setdefault((method, prefetch), []).append({"process_wall_s": wall, **t})
            floor = statistics.median(result["floor_s"])
            for (method, prefetch), done in runs.items():
                report(entry, floor, size, cache, method, prefetch, done)
            save(args.out, result)
        for method in args.methods:
            _, out = run(
                [
                    py,
                    __file__,
                    "--checkpoints",
                    str(args.checkpoints),
                    "--out",
                    "-",
                    "--video",
                    args.video,
                    "--child",
                    str(folder),
                    method,
                    str(args.new_tokens),
                ]
            )
            two = json.loads(out.strip().splitlines()[-1])
            two["ratio"] = two["first_s"] / two["second_s"]
            entry.setdefault("in_process", {})[method] = two
            print(
                f"{size} {method}: first answer {two['first_s']:.2f} s, second {two['second_s']:.2f} s, "
                f"another question {two['other_question_s']:.2f} s",
                flush=True,
            )
            save(args.out, result)


def save(out: Path, result: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
