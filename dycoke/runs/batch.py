"""Many questions from a CSV file: shared work per video, results written as they come, resumable.

Input CSV: required columns ``video`` and ``question``; optional ``id``, ``options`` (multiple-choice
options separated by ``|``, each starting with its letter: ``A. ...|B. ...``) and ``answer`` (ground
truth: the option letter, or a reference text). Video paths are relative to the CSV's folder. Without
an ``id`` column a row's id is its data-row number (1-based), stable as long as the file is.

Output: one record per (question, method), written as answers complete (``dycoke/results.py``); a
rerun skips every (id, method) already answered and retries failed ones.
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dycoke.config import Method, RunOptions, needs_vision_signals
from dycoke.errors import CsvError, DyCokeError
from dycoke.report import Report
from dycoke.runs.results import ResultWriter

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Question:
    """One row of the questions file."""

    id: str
    row: int
    video: str  # as written in the CSV
    path: Path  # resolved against the CSV's folder
    question: str
    options: tuple[str, ...] = ()
    answer: str | None = None
    problem: str | None = None  # why this row cannot be answered (empty question, missing video)

    def prompt(self) -> str:
        """The question as the model sees it (the paper's multiple-choice wording when options exist)."""
        if not self.options:
            return self.question
        return "\n".join([self.question, *self.options, MC_INSTRUCTION])


def read_questions(csv_path: str | Path) -> list[Question]:
    """Parse and check the questions file. A bad header raises CsvError; a bad row is kept with a
    ``problem`` so that it becomes a failed record and the batch goes on."""
    path = Path(csv_path)
    if not path.is_file():
        raise CsvError(f"questions file not found: {csv_path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in ("video", "question") if c not in header]
            if missing:
                raise CsvError(
                    f"{csv_path}: missing column(s) {', '.join(missing)}; required: video, question "
                    f"(optional: id, options, answer); found: {', '.join(header) or 'no header'}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except UnicodeDecodeError as exc:
        raise CsvError(f"{csv_path} is not a UTF-8 text CSV file ({exc.reason})") from exc
    except csv.Error as exc:
        raise CsvError(f"{csv_path}: malformed CSV ({exc})") from exc

    questions, seen = [], set()
    for number, row in enumerate(rows, start=1):
        qid = row.get("id") or str(number)
        if qid in seen:
            raise CsvError(f"{csv_path}: id '{qid}' appears twice (data row {number}); ids must be unique")
        seen.add(qid)
        video = row.get("video", "")
        resolved = (path.parent / video) if video else path.parent
        problem = None
        if not row.get("question"):
            problem = f"row {number}: empty question"
        elif not video:
            problem = f"row {number}: empty video path"
        elif not resolved.is_file():
            problem = f"row {number}: video not found: {resolved}"
        options = tuple(o.strip() for o in row.get("options", "").split("|") if o.strip())
        questions.append(
            Question(
                id=qid,
                row=number,
                video=video,
                path=resolved,
                question=row.get("question", ""),
                options=options,
                answer=row.get("answer") or None,
                problem=problem,
            )
        )
    return questions


_LETTER = re.compile(r"\b([A-Z])\b")


def answer_letter(text: str, num_options: int) -> str | None:
    """The option letter a multiple-choice answer gives (first standalone capital in range), else None."""
    valid = {chr(ord("A") + i) for i in range(num_options)}
    stripped = text.strip()
    if stripped[:1] in valid and (len(stripped) == 1 or not stripped[1].isalpha()):
        return stripped[0]
    for match in _LETTER.finditer(stripped):
        if match.group(1) in valid:
            return match.group(1)
    return None


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def is_correct(question: Question, answer: str) -> bool | None:
    """Letter match for multiple choice; normalised exact match for open questions; None without truth."""
    if question.answer is None:
        return None
    if question.options:
        return answer_letter(answer, len(question.options)) == question.answer.strip().upper()
    return _normalise(answer) == _normalise(question.answer)


def make_record(question: Question, method: str, report: Report | None, error: str | None) -> dict[str, Any]:
    """The output record of one (question, method)."""
    record: dict[str, Any] = {
        "id": question.id,
        "method": method,
        "video": question.video,
        "question": question.question,
        "options": list(question.options),
        "answer": None,
        "ground_truth": question.answer,
        "correct": None,
        "error": error,
    }
    if report is not None:
        record.update(
            answer=report.answer,
            correct=is_correct(question, report.answer),
            tokens={
                "frames": report.tokens.frames,
                "visual": report.tokens.visual,
                "visual_uncompressed": report.tokens.visual_uncompressed,
                "prompt": report.tokens.prompt,
                "generated": report.tokens.generated,
            },
            timings_s={
                "video_decode": report.timings_s.video_decode,
                "vision_encoder": report.timings_s.vision_encoder,
                "prefill": report.timings_s.prefill,
                "ttft": report.timings_s.ttft,
                "ms_per_token": report.timings_s.ms_per_token,
                "total": report.timings_s.total,
            },
            compression=dict(report.compression),
            kv_cache_bytes=report.memory.kv_cache_bytes,
        )
    return record


@dataclass
class BatchSummary:
    """What a batch run did (this run only, plus what the output already held)."""

    total: int = 0  # (question, method) pairs in the file
    already_done: int = 0
    answered: int = 0
    failed: int = 0
    seconds: float = 0.0
    correct: dict[str, int] = field(default_factory=dict)  # per method, over rows with ground truth
    graded: dict[str, int] = field(default_factory=dict)

    def accuracy(self) -> dict[str, float]:
        return {m: self.correct.get(m, 0) / n for m, n in self.graded.items() if n}


RecordCallback = Callable[[dict[str, Any]], None]


def group_by_video(questions: list[Question]) -> list[list[Question]]:
    """Questions grouped by video, videos in order of first appearance, rows in file order."""
    groups: dict[Path, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.path, []).append(q)
    return list(groups.values())


def run_batch(
    qa: Any,
    questions: list[Question],
    options: RunOptions,
    methods: list[Method],
    writer: ResultWriter,
    on_record: RecordCallback | None = None,
    *,
    batch_size: int = 1,
    share_prefix: bool = True,
    pictures: Path | None = None,
) -> BatchSummary:
    """Answer every (question, method) not yet in ``writer``.

    Per video: one decode, preprocess and encode; per video and method: one compression and (with
    ``share_prefix``) one prefill of the system prompt + video tokens, continued by every question,
    ``batch_size`` at a time. The next video is decoded on a CPU thread while the current one is
    being answered. Records are written as each batch completes. ``pictures``: a folder that gets
    ``<id>.<method>.png``, what the method kept for each answered row.
    """
    summary = BatchSummary(total=len(questions) * len(methods))
    for record in writer.kept:
        grade(summary, record)
    summary.already_done = sum(1 for q in questions for m in methods if (q.id, m) in writer.done)
    pending = [
        [q for q in group if any((q.id, m) not in writer.done for m in methods)] for group in group_by_video(questions)
    ]
    pending = [g for g in pending if g]
    start = time.perf_counter()

    def emit(question: Question, method: str, report: Report | None, error: str | None) -> None:
        record = make_record(question, method, report, error)
        writer.write(record)
        if error:
            summary.failed += 1
        else:
            summary.answered += 1
            grade(summary, record)
        if on_record is not None:
            on_record(record)

    def decode(group: list[Question]) -> Any:
        path = group[0].path  # the whole group shares it
        return qa.read(path, options.video) if path.is_file() else None

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dycoke-decode") as pool:
        future: Future[Any] | None = pool.submit(decode, pending[0]) if pending else None
        for index, group in enumerate(pending):
            assert future is not None
            decoded_or_error: Any
            try:
                decoded_or_error = future.result()
            except DyCokeError as exc:
                decoded_or_error = exc
            future = pool.submit(decode, pending[index + 1]) if index + 1 < len(pending) else None
            _answer_group(
                qa, group, decoded_or_error, options, methods, writer, emit, batch_size, share_prefix, pictures
            )
    summary.seconds = time.perf_counter() - start
    return summary


Emit = Callable[[Question, str, Report | None, str | None], None]


def _answer_group(
    qa: Any,
    group: list[Question],
    decoded: Any,
    options: RunOptions,
    methods: list[Method],
    writer: ResultWriter,
    emit: Emit,
    batch_size: int,
    share_prefix: bool,
    pictures: Path | None = None,
) -> None:
    """Every pending (question, method) of one video, sharing its decoded and encoded frames."""
    prepared, video_error = None, None
    if isinstance(decoded, DyCokeError):
        video_error = str(decoded)
    elif decoded is not None:
        try:
            prepared = qa.prepare(decoded, options.video, with_signals=needs_vision_signals(list(methods)))
        except DyCokeError as exc:
            video_error = str(exc)
    for method in methods:
        todo = [q for q in group if (q.id, method) not in writer.done]
        answerable = []
        for question in todo:
            if question.problem or video_error:
                emit(question, method, None, question.problem or video_error)
            else:
                answerable.append(question)
        if not answerable:
            continue
        run = replace(options, method=replace(options.method, method=method))
        _answer_method(qa, prepared, answerable, run, emit, batch_size, share_prefix, pictures)


def _answer_method(
    qa: Any,
    prepared: Any,
    questions: list[Question],
    run: RunOptions,
    emit: Emit,
    batch_size: int,
    share_prefix: bool,
    pictures: Path | None = None,
) -> None:
    """One method's answers to questions on one video, emitted batch by batch; a failure fails only
    the questions not answered yet."""
    method = run.method.method
    done = 0

    def on_reports(reports: list[Report]) -> None:
        nonlocal done
        for report in reports:
            if pictures is not None and report.trace is not None:
                from dycoke.visualize import save_png

                name = re.sub(r"[^A-Za-z0-9._-]", "_", questions[done].id)
                save_png([report.trace], pictures / f"{name}.{method}.png", [f"{questions[done].id} · {method}"])
            emit(questions[done], method, report, None)
            done += 1

    try:
        qa.answer_many(
            prepared,
            [q.prompt() for q in questions],
            run,
            batch_size=batch_size,
            share_prefix=share_prefix,
            on_reports=on_reports,
            record=pictures is not None,
        )
    except DyCokeError as exc:
        for question in questions[done:]:
            emit(question, method, None, str(exc))


def grade(summary: BatchSummary, record: dict[str, Any]) -> None:
    """Count a successful record towards its method's accuracy (when it has a ground truth)."""
    correct = record.get("correct")
    if correct in (None, ""):
        return
    method = str(record["method"])
    summary.graded[method] = summary.graded.get(method, 0) + 1
    if correct is True or correct == "true":
        summary.correct[method] = summary.correct.get(method, 0) + 1
