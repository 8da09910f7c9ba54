"""Batch mode: CSV parsing, durable resumable output, shared work per video, exit codes."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.errors import CsvError, OutOfMemoryError
from dycoke.pipeline import VideoQA
from dycoke.runs.batch import (
    MC_INSTRUCTION,
    Question,
    answer_letter,
    is_correct,
    read_questions,
    run_batch,
)
from dycoke.runs.results import ResultWriter

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
runner = CliRunner()


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(SAMPLES / "bigbuckbunny.mp4", tmp_path / "bbb.mp4")
    return tmp_path


# -- parsing ---------------------------------------------------------------------------------------


def test_samples_questions_parse() -> None:
    questions = read_questions(SAMPLES / "questions.csv")
    assert len(questions) == 6 and all(q.problem is None for q in questions)
    mc = next(q for q in questions if q.id == "bbb-action")
    assert mc.options[1] == "B. It stretches its arms and yawns" and mc.answer == "B"
    assert mc.prompt().endswith("D. It digs a new hole\n" + MC_INSTRUCTION)


def test_missing_required_column(workdir: Path) -> None:
    path = write_csv(workdir / "q.csv", ["clip", "question"], [["bbb.mp4", "What?"]])
    with pytest.raises(CsvError, match="missing column\\(s\\) video; required: video, question"):
        read_questions(path)


def test_bad_rows_are_kept_with_their_problem(workdir: Path) -> None:
    path = write_csv(
        workdir / "q.csv",
        ["video", "question"],
        [["bbb.mp4", "Fine?"], ["bbb.mp4", ""], ["nope.mp4", "Where?"], ["", "No video?"]],
    )
    q = read_questions(path)
    assert [x.id for x in q] == ["1", "2", "3", "4"]  # no id column: data-row numbers
    assert q[0].problem is None
    assert q[1].problem == "row 2: empty question"
    assert q[2].problem == f"row 3: video not found: {workdir / 'nope.mp4'}"
    assert q[3].problem == "row 4: empty video path"


def test_duplicate_ids_are_refused(workdir: Path) -> None:
    path = write_csv(workdir / "q.csv", ["id", "video", "question"], [["a", "bbb.mp4", "x"], ["a", "bbb.mp4", "y"]])
    with pytest.raises(CsvError, match="id 'a' appears twice"):
        read_questions(path)


def test_missing_file() -> None:
    with pytest.raises(CsvError, match=r"questions file not found: nowhere\.csv"):
        read_questions("nowhere.csv")


@pytest.mark.parametrize(
    ("text", "letter"),
    [("B", "B"), ("B.", "B"), ("(C) it yawns", "C"), ("The answer is D.", "D"), ("A rabbit", "A"), ("none", None)],
)
def test_answer_letter(text: str, letter: str | None) -> None:
    assert answer_letter(text, 4) == letter


def test_grading() -> None:
    mc = Question("1", 1, "v", Path("v"), "q", ("A. x", "B. y"), "B")
    assert is_correct(mc, "B. y") is True and is_correct(mc, "A") is False
    open_q = Question("2", 2, "v", Path("v"), "q", (), "A rabbit")
    assert is_correct(open_q, "a rabbit.") is True and is_correct(open_q, "a hare") is False
    assert is_correct(Question("3", 3, "v", Path("v"), "q"), "x") is None


# -- durable output --------------------------------------------------------------------------------


def record(qid: str, method: str = "dycoke", error: str | None = None) -> dict[str, Any]:
    return {"id": qid, "method": method, "video": "v", "question": "q", "options": [], "answer": "a",
            "ground_truth": None, "correct": None, "error": error}  # fmt: skip


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_drops_failed_and_torn_records(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"answers{suffix}"
    with ResultWriter(out) as w:
        w.write(record("1"))
        w.write(record("2", error="boom"))
        w.write(record("3"))
    with out.open("a") as f:  # a crash in the middle of writing record 4
        f.write('{"id": "4", "meth' if suffix == ".jsonl" else "4,dyc")
    with ResultWriter(out) as w:
        assert w.done == {("1", "dycoke"), ("3", "dycoke")}
        w.write(record("2"))
    with ResultWriter(out) as w:
        assert w.done == {("1", "dycoke"), ("2", "dycoke"), ("3", "dycoke")}
    if suffix == ".jsonl":
        ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    else:
        ids = [row["id"] for row in csv.DictReader(out.open())]
    assert sorted(ids) == ["1", "2", "3"]  # no duplicates, no failures, no torn line


def test_overwrite_starts_over(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    with ResultWriter(out) as w:
        w.write(record("1"))
    with ResultWriter(out, overwrite=True) as w:
        assert w.done == set()
    assert out.read_text() == ""


def test_output_extension_is_checked(tmp_path: Path) -> None:
    with pytest.raises(CsvError, match=r"output must end in \.jsonl or \.csv, got .a\.txt."):
        ResultWriter(tmp_path / "a.txt")


# -- running ---------------------------------------------------------------------------------------


class CountingQA:
    """The real VideoQA, counting how often each video is prepared (decoded and encoded)."""

    def __init__(self, qa: VideoQA) -> None:
        self.qa, self.prepared, self.answered = qa, 0, 0

    def read(self, video: Any, options: Any) -> Any:
        return self.qa.read(video, options)

    def prepare(self, video: Any, options: Any, **kwargs: Any) -> Any:
        self.prepared += 1
        return self.qa.prepare(video, options, **kwargs)

    def answer_many(self, prepared: Any, questions: list[str], options: Any, **kwargs: Any) -> Any:
        self.answered += len(questions)
        return self.qa.answer_many(prepared, questions, options, **kwargs)


@pytest.fixture(scope="module")
def tiny_qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))


OPTIONS = RunOptions(
    video=VideoOptions(num_frames=4),
    generation=GenerationOptions(max_new_tokens=3, min_new_tokens=3),
    method=MethodOptions(prune_layer=2),
)


def test_one_decode_per_video_and_a_record_per_question(tiny_qa: VideoQA, tmp_path: Path) -> None:
    qa = CountingQA(tiny_qa)
    questions = read_questions(SAMPLES / "questions.csv")
    with ResultWriter(tmp_path / "a.jsonl") as w:
        summary = run_batch(qa, questions, OPTIONS, ["full", "dycoke"], w)
    assert qa.prepared == 2  # two clips
    assert qa.answered == 12 and summary.answered == 12 and summary.failed == 0
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert {(r["id"], r["method"]) for r in lines} == {(q.id, m) for q in questions for m in ("full", "dycoke")}
    assert set(summary.graded) == {"full", "dycoke"} and summary.graded["full"] == 6


def test_interrupted_run_resumes_without_loss_or_duplicates(tiny_qa: VideoQA, tmp_path: Path) -> None:
    questions = read_questions(SAMPLES / "questions.csv")
    out = tmp_path / "a.jsonl"
    seen: list[str] = []

    def interrupt_after_two(rec: dict[str, Any]) -> None:
        seen.append(rec["id"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), ResultWriter(out) as w:
        run_batch(tiny_qa, questions, OPTIONS, ["dycoke"], w, on_record=interrupt_after_two)
    assert len(out.read_text().splitlines()) == 2  # both answered records are on disk
    qa = CountingQA(tiny_qa)
    with ResultWriter(out) as w:
        summary = run_batch(qa, questions, OPTIONS, ["dycoke"], w)
    assert qa.answered == 4 and summary.already_done == 2
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(q.id for q in questions)


def test_cli_batch_bad_rows_and_exit_code(tiny_checkpoint: Path, workdir: Path) -> None:
    questions = write_csv(
        workdir / "q.csv",
        ["id", "video", "question", "options", "answer"],
        [
            ["ok", "bbb.mp4", "What animal?", "A. A rabbit|B. A dog", "A"],
            ["empty", "bbb.mp4", "", "", ""],
            ["missing", "gone.mp4", "Where?", "", ""],
        ],
    )
    out = workdir / "answers.csv"
    args = ["batch", str(questions), "--out", str(out), "--model", str(tiny_checkpoint), "--device", "cpu"]
    args += ["--frames", "4", "--max-new-tokens", "3", "-L", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.stderr
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    assert rows["ok"]["error"] == "" and rows["ok"]["visual_tokens"] == "785"  # 4 frames kept whole + newline
    assert rows["empty"]["error"] == "row 2: empty question"
    assert rows["missing"]["error"].startswith("row 3: video not found")
    assert result.stdout == "" and "2 failed" in result.stderr
    # rerun: the good row is kept, the failed ones are retried (and fail again), nothing duplicated
    again = runner.invoke(app, args)
    assert again.exit_code == 3
    assert sorted(r["id"] for r in csv.DictReader(out.open())) == ["empty", "missing", "ok"]


def test_cli_batch_bad_header_is_fatal(tiny_checkpoint: Path, workdir: Path) -> None:
    questions = write_csv(workdir / "q.csv", ["video"], [["bbb.mp4"]])
    result = runner.invoke(app, ["batch", str(questions), "--out", str(workdir / "a.jsonl")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "missing column(s) question" in result.stderr


def test_batched_and_shared_records_equal_one_by_one(tiny_qa: VideoQA, tmp_path: Path) -> None:
    questions = read_questions(SAMPLES / "questions.csv")
    answers = {}
    for name, kwargs in {"alone": {"share_prefix": False}, "shared": {"batch_size": 2}}.items():
        with ResultWriter(tmp_path / f"{name}.jsonl") as w:
            run_batch(tiny_qa, questions, OPTIONS, ["full", "dycoke"], w, **kwargs)  # type: ignore[arg-type]
        records = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        answers[name] = {(r["id"], r["method"]): (r["answer"], r["tokens"], r["kv_cache_bytes"]) for r in records}
        dycoke = [r["compression"] for r in records if r["method"] == "dycoke"]
        assert dycoke and all(0 <= c["pruned_step_share"] <= 1 and c["merge_ratio"] == 0.7 for c in dycoke)
    assert answers["shared"] == answers["alone"] and len(answers["alone"]) == 12


class FailingAfterFirstBatch(CountingQA):
    def answer_many(self, prepared: Any, questions: list[str], options: Any, **kwargs: Any) -> Any:
        on_reports = kwargs.pop("on_reports")
        first = self.qa.answer_many(prepared, questions[:2], options, **kwargs)
        on_reports(first)
        raise OutOfMemoryError("out of GPU memory in generation")


def test_a_failing_batch_fails_only_what_was_not_answered(tiny_qa: VideoQA, tmp_path: Path) -> None:
    questions = [q for q in read_questions(SAMPLES / "questions.csv") if q.video == "bigbuckbunny.mp4"]
    assert len(questions) >= 3
    with ResultWriter(tmp_path / "a.jsonl") as w:
        summary = run_batch(FailingAfterFirstBatch(tiny_qa), questions, OPTIONS, ["full"], w, batch_size=2)
    records = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["error"] for r in records[:2]] == [None, None]
    assert all(r["error"] == "out of GPU memory in generation" for r in records[2:])
    assert summary.answered == 2 and summary.failed == len(questions) - 2


def test_cli_batch_size_is_checked(workdir: Path) -> None:
    questions = write_csv(workdir / "q.csv", ["video", "question"], [["bbb.mp4", "What?"]])
    result = runner.invoke(app, ["batch", str(questions), "--out", str(workdir / "a.jsonl"), "--batch-size", "0"])
    assert result.exit_code == 2
    assert result.stderr == "Error: batch size must be a positive integer, got 0\n"


def test_cli_prefill_rows_is_checked(workdir: Path) -> None:
    questions = write_csv(workdir / "q.csv", ["video", "question"], [["bbb.mp4", "What?"]])
    result = runner.invoke(app, ["batch", str(questions), "--out", str(workdir / "a.jsonl"), "--prefill-rows", "-2"])
    assert result.exit_code == 2
    assert result.stderr == "Error: prefill-rows must be >= 0 (0 prefills a batch at once), got -2\n"
