"""Where a fresh `dycoke` command spends its seconds: every thread's Python stack, sampled.

Runs the CLI in this process (``cli.app.main`` with the arguments after ``--``) while a sampler
thread records each thread's stack every ``--interval`` seconds from process start. Writes the
samples and prints, per thread, a timeline of runs of samples that share the same "where" (the
innermost frame in our code, and the innermost library frame below it), so a start-up that takes
15 s instead of 6 s shows which import, wait or call holds the main thread, and what the helper
threads (video readers, weight read-ahead, kernel compile) do meanwhile:

    python benchmarks/sample_stacks.py --out stacks.json -- ask samples/bigbuckbunny.mp4 "Q" --model DIR

A sample is taken only when the sampler gets the GIL, so a C call that holds the GIL shows as one
long gap between samples rather than as samples: the timeline prints gaps over 3 intervals.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "dycoke"), str(ROOT / "cli"), str(ROOT / "benchmarks"))


def _describe(frame: FrameType | None, depth: int) -> list[str]:
    """``file:line function`` of the innermost ``depth`` frames, innermost first."""
    out: list[str] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        out.append(f"{_short(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out


def _short(filename: str) -> str:
    for marker in ("site-packages/", "dist-packages/", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename.rsplit("/", 2)[-1] if "/lib/python" in filename else filename


def where(stack: list[str]) -> str:
    """One line for a stack (innermost first): the innermost frame of ours, the innermost import
    (``<frozen importlib>`` frames skipped) and the innermost frame overall."""
    ours = next((s for s in stack if s.startswith(("dycoke/", "cli/", "benchmarks/"))), "-")
    inner = next((s for s in stack if not s.startswith("<frozen")), "-")
    module = next((s for s in stack if s.endswith(" <module>") and not s.startswith("<frozen")), "")
    return f"{ours} | {module.split(' ')[0] if module else '-'} | {inner}"


class Sampler(threading.Thread):
    def __init__(self, interval: float, origin: float, depth: int = 400) -> None:
        super().__init__(name="stack-sampler", daemon=True)
        self.interval = interval
        self.origin = origin
        self.depth = depth
        self.samples: list[dict[str, Any]] = []
        self.stopped = threading.Event()
        self.fork_safe = True  # holds no lock a forked child could need (``dycoke.reading``)

    def run(self) -> None:
        me = threading.get_ident()
        while not self.stopped.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            now = time.time() - self.origin
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    stack = _describe(frame, self.depth)
                    self.samples.append({"t": now, "thread": names.get(ident, str(ident)), "stack": stack})


def timeline(samples: list[dict[str, Any]], interval: float, coarse: bool = False) -> list[str]:
    """Per thread, runs of consecutive samples with the same ``where`` (``coarse``: the same frame of
    ours only), with their start and length."""
    key_of = (lambda stack: where(stack).split(" | ")[0]) if coarse else where
    lines = []
    for thread in dict.fromkeys(s["thread"] for s in samples):
        lines.append(f"== {thread}")
        mine = [s for s in samples if s["thread"] == thread]
        start = prev_t = mine[0]["t"]
        current: str | None = key_of(mine[0]["stack"])
        for s in [*mine[1:], None]:
            key = key_of(s["stack"]) if s else None
            gap = s["t"] - prev_t if s is not None else 0.0
            if key != current or gap > 3 * interval or s is None:
                lines.append(f"{start:7.2f} +{prev_t - start + interval:5.2f}s  {current}")
                if gap > 3 * interval:
                    lines.append(f"{prev_t:7.2f} +{gap:5.2f}s  (no sample: the GIL was held)")
                if s is not None:
                    start, current = s["t"], key
            if s is not None:
                prev_t = s["t"]
    return lines


def interned(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The samples with each distinct stack stored once: ``stacks`` and ``samples`` as (t, thread, id)."""
    ids: dict[tuple[str, ...], int] = {}
    rows = [[round(s["t"], 3), s["thread"], ids.setdefault(tuple(s["stack"]), len(ids))] for s in samples]
    return {"stacks": [list(k) for k in ids], "samples": rows}


def main() -> None:
    origin = time.time()
    try:
        import psutil

        origin = float(psutil.Process().create_time())
    except Exception:
        pass
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv[:split])
    sampler = Sampler(args.interval, origin)
    sampler.start()
    sys.path.insert(0, str(ROOT))
    sys.argv = ["dycoke", *argv[split + 1 :]]
    code: Any = 0
    try:
        import cli.app

        cli.app.exit_at_once = lambda: None  # the CLI's fast exit would skip writing the samples
        cli.app.main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sampler.stopped.set()
        sampler.join()
        end = time.time() - origin
        lines = timeline(sampler.samples, args.interval)
        coarse = timeline(sampler.samples, args.interval, coarse=True)
        hot = Counter(where(s["stack"]) for s in sampler.samples if s["thread"] == "MainThread")
        args.out.write_text(
            json.dumps({"argv": sys.argv, "end_s": end, "interval_s": args.interval, **interned(sampler.samples)})
        )
        args.out.with_suffix(".txt").write_text(
            "\n".join(
                [f"process start to exit: {end:.2f} s", "# coarse: our innermost frame", *coarse]
                + ["# fine: ours | innermost module import | innermost frame", *lines]
                + ["== main thread, most samples"]
                + [f"{n * args.interval:6.2f}s  {k}" for k, n in hot.most_common(40)]
            )
            + "\n"
        )
        print(f"stacks: {args.out} (+ .txt), {end:.2f} s", file=sys.stderr)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
