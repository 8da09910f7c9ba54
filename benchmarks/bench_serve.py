"""`dycoke serve` as a user meets it: the wall clock of `dycoke ask --server` from the command to its exit
(first question on a video, then a follow-up on the same video), and the throughput of 8 concurrent
clients against the library's batch mode (`answer_many`, the path of `dycoke batch`) at the same batch size.
The clients connect first and start together (a warm-up round, then the measured one: its questions per
second and how many batches the server ran for them, `concurrent_batches`).

    python benchmarks/bench_serve.py --model DIR --video samples/bigbuckbunny.mp4 --new-tokens 64 \\
        --out benchmarks/results/serve-h200.json

DIR: a checkpoint (bench_cold.py writes real-shape random ones). The server runs as its own process.
The questions stream their answers, as `dycoke ask --server` does by default; `--stages` asks them with
`--json` instead (one reply, not streamed) to record the server's per-stage timings of each.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bytecode import add_bytecode_argument, child_environment, describe  # noqa: E402

QUESTIONS = [f"Question {i}: what happens in the video, and what colour is item {i}?" for i in range(32)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(command: list[str], env: dict[str, str], stages: list[dict[str, Any]] | None = None) -> float:
    """Wall seconds of ``command``; with ``stages``, ``command`` is a ``dycoke ask --server ... --json``
    and its report's per-stage timings (the server's view of the same answer) are appended to it."""
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr[-1500:]}")
    if stages is not None:
        report = json.loads(done.stdout)
        stages.append(report.get("timings_s", {}))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bytecode-cache", type=Path, default=Path("/tmp/dycoke-pycache"))
    parser.add_argument(
        "--stages", action="store_true", help="ask with --json (not streamed) and record each answer's stages"
    )
    parser.add_argument(
        "--serve-option",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `dycoke serve` (repeat it: --serve-option=--batch-wait-ms --serve-option=50)",
    )
    add_bytecode_argument(parser)
    args = parser.parse_args()
    import httpx

    env = child_environment(args.bytecode, args.bytecode_cache, {"PYTHONUNBUFFERED": "1"})
    video = str(Path(args.video).resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cli.app", "serve", "--model", args.model, "--port", str(port)]
    command += ["--allowed-local-media-path", str(Path(video).parent), "--max-batch-size", str(args.clients)]
    command += args.serve_option
    t_start = time.perf_counter()
    if args.bytecode == "cached":  # untimed: the server's and the client's modules compiled once
        subprocess.run([sys.executable, "-m", "cli.app", "serve", "--help"], cwd=ROOT, env=env, capture_output=True)
        subprocess.run([sys.executable, "-c", "import dycoke.pipeline, cli.serving"], cwd=ROOT, env=env, check=True)
    server = subprocess.Popen(command, cwd=ROOT, env=env)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        **describe(args.bytecode),
    }
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if server.poll() is not None or time.perf_counter() - t_start > 300:
                raise RuntimeError("the server did not start")
        result["server_ready_s"] = time.perf_counter() - t_start
        ask = [sys.executable, "-m", "cli.app", "ask", video, "", "--server", url, "--json" if args.stages else "-q"]
        ask += ["--max-new-tokens", str(args.new_tokens), "--min-new-tokens", str(args.new_tokens)]
        timed([*ask[:5], "Warm-up question", *ask[6:], "--frames", "8"], env)  # untimed: client bytecode
        firsts, follows = [], []
        stages: list[dict[str, Any]] | None = [] if args.stages else None
        for m, method in enumerate(("dycoke", "full")):
            for i in range(2):  # a fresh video entry per round: the frame count differs, so the cache misses
                frames = str(32 - 2 * m - i)
                first = ask.copy()
                first[5] = "What is the rabbit doing?"
                firsts.append(timed([*first, "--method", method, "--frames", frames], env, stages))
                follow = ask.copy()
                follow[5] = "And what happens next?"
                follows.append(timed([*follow, "--method", method, "--frames", frames], env, stages))
            result[f"{method}_first_question_s"], result[f"{method}_follow_up_s"] = firsts[-2:], follows[-2:]
        if stages is not None:
            result["stages_in_order"] = stages  # per question, in the order asked: first, follow-up, first, ...
        print(json.dumps({k: v for k, v in result.items() if k.endswith("_s")}), flush=True)

        body = {
            "max_tokens": args.new_tokens,
            "min_new_tokens": args.new_tokens,
            "temperature": 0,
            "num_frames": 32,
            "method": "dycoke",
        }

        def client(index: int, times: list[float], start: threading.Barrier) -> None:
            with httpx.Client(timeout=600) as http:
                http.get(f"{url}/health").raise_for_status()  # connected before the clock starts
                start.wait()
                for k in range(args.per_client):
                    question = QUESTIONS[(index * args.per_client + k) % len(QUESTIONS)]
                    content = [{"type": "video_url", "video_url": {"url": Path(video).as_uri()}}]
                    content.append({"type": "text", "text": question})
                    reply = http.post(
                        f"{url}/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": content}]}
                    )
                    reply.raise_for_status()
                    times.append(time.perf_counter())

        # Every client connects, then all start together: the clock measures the questions, not the
        # threads' start and the connections (which spread the first requests over more than the
        # server's batch wait, so that a round's first batch went out short and the round took one
        # batch more: a fake 0.3 s engine on the CPU ran 1+8+8+8+7 batches for 32 questions)
        for round_ in ("warm-up", "measured"):
            done: list[float] = []
            start = threading.Barrier(args.clients + 1)
            threads = [threading.Thread(target=client, args=(i, done, start)) for i in range(args.clients)]
            for t in threads:
                t.start()
            before = httpx.get(f"{url}/health").json().get("engine", {})
            start.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            if round_ == "measured":
                after = httpx.get(f"{url}/health").json().get("engine", {})
                result["concurrent_questions"] = len(done)
                result["concurrent_q_per_s"] = len(done) / elapsed
                if "batches" in before and "batches" in after:
                    result["concurrent_batches"] = after["batches"] - before["batches"]
        health = httpx.get(f"{url}/health").json()
        result["server_engine"] = health.get("engine")
    finally:
        server.send_signal(signal.SIGTERM)
        result["server_exit_code"] = server.wait(timeout=30)

    sys.path.insert(0, str(ROOT))
    from dycoke import VideoQA
    from dycoke.config import GenerationOptions, MethodOptions, RunOptions, VideoOptions

    qa = VideoQA.load(args.model)
    options = RunOptions(
        video=VideoOptions(num_frames=32),
        generation=GenerationOptions(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens),
        method=MethodOptions(method="dycoke"),
    )
    total = args.clients * args.per_client
    rates = []
    for _ in range(2):  # warm-up, then measured
        t0 = time.perf_counter()
        prepared = qa.prepare(video, options.video)
        qa.answer_many(prepared, QUESTIONS[:total], options, batch_size=args.clients)
        rates.append(total / (time.perf_counter() - t0))
    result["batch_mode_q_per_s"] = rates[-1]
    result["concurrent_vs_batch"] = result["concurrent_q_per_s"] / rates[-1]
    result["first_question_median_s"] = statistics.median(firsts)
    result["follow_up_median_s"] = statistics.median(follows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
