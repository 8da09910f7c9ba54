"""Data-parallel batch runs: disjoint shares, part files merged, nothing lost or duplicated, resume."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dycoke.errors import ConfigError
from dycoke.runs.batch import BatchSummary, Question, make_record, read_questions
from dycoke.runs.parallel import Shard, assign, process_device, run_sharded
from dycoke.runs.results import ResultWriter, merge_parts, part_path, part_paths, read_records

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


def question(qid: str, video: str) -> Question:
    return Question(id=qid, row=0, video=video, path=Path(video), question="q?")


def test_assign_keeps_videos_whole_and_balances_work() -> None:
    qs = [question(f"a{i}", "a.mp4") for i in range(4)]
    qs += [question(f"b{i}", "b.mp4") for i in range(3)]
    qs += [question(f"c{i}", "c.mp4") for i in range(2)]
    qs += [question("d0", "d.mp4")]
    shares = assign(qs, ["dycoke"], set(), 2)
    assert [[q.id[0] for q in s] for s in shares] == [list("aaaad"), list("bbbcc")]
    assert sorted(q.id for s in shares for q in s) == sorted(q.id for q in qs)
    # answered questions are not work: the split follows what is left
    done = {(f"a{i}", "dycoke") for i in range(4)}
    assert [[q.id[0] for q in s] for s in assign(qs, ["dycoke"], done, 2)] == [list("bbb"), list("ccd")]
    assert assign(qs, ["dycoke"], set(), 3) == assign(qs, ["dycoke"], set(), 3)  # every process agrees


def test_process_device() -> None:
    two = Shard(rank=1, world=2, local_rank=1)
    assert process_device("auto", None, Shard(), True) == "auto"
    assert process_device("auto", None, two, True) == "cuda:1"
    assert process_device("cuda", None, two, True) == "cuda:1"
    assert process_device("auto", None, two, False) == "cpu"
    with pytest.raises(ConfigError, match="--device cuda:0 names one GPU; with 2 processes use auto or cuda"):
        process_device("cuda:0", None, two, True)
    with pytest.raises(ConfigError, match="--device-map auto spreads one model over every GPU"):
        process_device("auto", "auto", two, True)


def record(qid: str, answer: str | None, error: str | None = None) -> dict[str, Any]:
    r = make_record(question(qid, "a.mp4"), "dycoke", None, error)
    r["answer"] = answer
    return r


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_merge_parts_prefers_success_and_drops_torn_lines(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"answers{suffix}"
    with ResultWriter(out) as w:
        w.write(record("1", "one"))
        w.write(record("2", None, "failed before"))
    with ResultWriter(part_path(out, 0)) as w:
        w.write(record("2", "two"))
        w.write(record("3", None, "failed"))
    with ResultWriter(part_path(out, 1)) as w:
        w.write(record("1", "one again"))  # cannot happen in a real run; the first success stays
        w.write(record("4", "four"))
    with part_path(out, 1).open("a") as f:
        f.write('{"id": "5", "meth' if suffix == ".jsonl" else "5,dyc")  # torn by a crash
    (tmp_path / f"answers{suffix}.part-x{suffix}").write_text("")  # not a part file
    assert len(part_paths(out)) == 2
    assert merge_parts(out) == 2  # ids 3 and 4 are new
    records, torn = read_records(out)
    assert not torn and part_paths(out) == []
    got = {r["id"]: (r["answer"] or None, r["error"] or None) for r in records}
    assert got == {"1": ("one", None), "2": ("two", None), "3": (None, "failed"), "4": ("four", None)}


class ThreadBarrier:
    """accelerate's PartialState.wait_for_everyone, for threads."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=30)


def fake_answers(share: list[Question], writer: ResultWriter, fail: set[str], answered: list[str]) -> BatchSummary:
    summary = BatchSummary(total=len(share))
    for q in share:
        if (q.id, "dycoke") in writer.done:
            continue
        answered.append(q.id)
        error = "boom" if q.id in fail else None
        writer.write(make_record(q, "dycoke", None, error) | {"answer": None if error else f"answer {q.id}"})
    return summary


def test_two_shards_merge_into_one_output_and_resume(tmp_path: Path) -> None:
    questions = read_questions(SAMPLES / "questions.csv")
    out = tmp_path / "answers.jsonl"
    shares: dict[int, list[str]] = {}

    def run(world: int, fail: set[str]) -> dict[int, BatchSummary]:
        barrier = ThreadBarrier(threading.Barrier(world))
        results: dict[int, BatchSummary] = {}

        def worker(rank: int) -> None:
            def answer(share: list[Question], writer: ResultWriter) -> BatchSummary:
                shares[rank] = []
                return fake_answers(share, writer, fail, shares[rank])

            shard = Shard(rank=rank, world=world, local_rank=rank, state=barrier)
            results[rank] = run_sharded(questions, ["dycoke"], out, shard, answer)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results

    first = run(2, fail={"box-word"})
    assert set(shares[0]).isdisjoint(shares[1]) and len(shares[0]) + len(shares[1]) == len(questions)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(q.id for q in questions)
    assert first[0].failed == 1 and first[0].answered == len(questions) - 1
    assert part_paths(out) == [] and not list(tmp_path.glob("*.done"))

    shares.clear()
    again = run(3, fail=set())  # a rerun with more processes retries only the failed question
    assert sorted(i for s in shares.values() for i in s) == ["box-word"]
    assert again[0].failed == 0 and again[0].answered == 1 and again[0].already_done == len(questions) - 1
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(q.id for q in questions)
    assert all(r["error"] is None for r in records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The real thing: ``accelerate launch`` starts two CPU processes (gloo), each answers a share."""
    shutil.copytree(SAMPLES, tmp_path / "samples")
    out = tmp_path / "answers.jsonl"
    # An earlier interrupted 2-process run left a part file with one answer and a torn line.
    kept = make_record(read_questions(tmp_path / "samples" / "questions.csv")[0], "dycoke", None, None)
    kept["answer"] = "answered before the interruption"
    part_path(out, 1).write_text(json.dumps(kept) + "\n" + '{"id": "bbb-col')
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += ["-m", "cli.app", "batch", str(tmp_path / "samples" / "questions.csv"), "--out", str(out)]
    command += ["--model", str(tiny_checkpoint), "--frames", "4", "--max-new-tokens", "3", "-L", "2", "-b", "2"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert sorted(ids) == sorted(q.id for q in read_questions(SAMPLES / "questions.csv"))  # no loss, no duplicate
    assert records[0]["answer"] == "answered before the interruption"  # resumed, not answered again
    assert all(r["error"] is None and r["tokens"]["generated"] == 3 for r in records[1:])
    assert part_paths(out) == [] and not list(tmp_path.glob("*.done"))
    assert "6 answered" in result.stderr or "5 answered" in result.stderr, result.stderr[-2000:]
