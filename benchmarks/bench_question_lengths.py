"""Answers to questions of other lengths in one process: what a new prompt length costs.

A benchmark that repeats one question measures shapes already seen; a user asks questions of every
length. Per setting, a fresh process loads the model (``--model``: a checkpoint, e.g. the random
7B-shape one ``bench_cold.py`` writes) and answers five questions in turn: one, the same again, then
three of other lengths; each answer's wall clock and stages are recorded. The settings alternate
``DYCOKE_CUDNN_PREFILL`` (1: torch may take cuDNN attention for the prefill and the vision encoder,
as before; 0: flash or memory-efficient attention there, ``dycoke.sdpa_choice.without_cudnn_attention``),
per method and decoder (``graph``, or ``hf`` for transformers' ``generate``).

    python benchmarks/bench_question_lengths.py --model DIR --methods dycoke full --decoders graph hf \\
        --out benchmarks/results/question-lengths-h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the rabbit doing?",
    "What is the rabbit doing?",
    "Describe everything the rabbit does, in order, and say what the other animals do.",
    "Why?",
    "What colour is the sky, and how many trees can you see behind the rabbit at the start?",
]


def answers_in_turn(
    model: str, video: str, questions: list[str], method: str, new_tokens: int, decoder: str = "auto"
) -> list[dict[str, float]]:
    """Load ``model`` once, answer ``questions`` in turn; per answer its wall clock from the file
    (``wall_s``), the report's timings (every stage, the load left out) and the garbage collections that
    ran during it (``gc_full``: how many of the oldest generation, ``gc_s``: the seconds all of them
    took). ``bench_cold.py`` uses it too."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dycoke import VideoQA

    collections = CollectionClock()
    gc.callbacks.append(collections)
    qa = VideoQA.load(model)
    answers = []
    for question in questions:
        collections.reset()
        t0 = time.perf_counter()
        report = qa.ask(
            video, question, method=method, max_new_tokens=new_tokens, min_new_tokens=new_tokens, decoder=decoder
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timings = dataclasses.asdict(report.timings_s)
        stages = {k: v for k, v in timings.items() if isinstance(v, float) and k != "load"}
        answers.append({"wall_s": time.perf_counter() - t0, **stages, **collections.seen()})
    gc.callbacks.remove(collections)
    return answers


class CollectionClock:
    """A ``gc.callbacks`` entry: counts full (oldest-generation) collections and times every collection."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.full, self.seconds, self.started = 0, 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self.started
        self.full += info.get("generation") == 2

    def seen(self) -> dict[str, float]:
        return {"gc_full": self.full, "gc_s": self.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--methods", nargs="+", default=["dycoke", "full"])
    parser.add_argument("--decoders", nargs="+", default=["graph"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.child:
        method, decoder, tokens = args.child
        print(json.dumps(answers_in_turn(args.model, args.video, QUESTIONS, method, int(tokens), decoder)))
        return

    import torch
    import transformers

    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "questions": QUESTIONS,
        "runs": [],
    }
    for decoder in args.decoders:
        for method in args.methods:
            for cudnn in ("1", "0"):
                command = [sys.executable, __file__, "--model", args.model, "--video", args.video, "--out", "-"]
                command += ["--child", method, decoder, str(args.new_tokens)]
                env = {**os.environ, "DYCOKE_CUDNN_PREFILL": cudnn}
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{method} {decoder} failed: {done.stderr[-2000:]}")
                answers = json.loads(done.stdout.strip().splitlines()[-1])
                run = {"method": method, "decoder": decoder, "cudnn_prefill": cudnn, "answers": answers}
                result["runs"].append(run)
                walls = " ".join(f"{a['wall_s']:.2f}" for a in answers)
                print(f"{method} {decoder} DYCOKE_CUDNN_PREFILL={cudnn}: answers {walls} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
