"""The output of a batch run: one record per (question, method), durable, resumable, mergeable.

Records are JSON lines (``.jsonl``) or CSV rows (``.csv``), appended and flushed to disk one by one.
Opening an existing output keeps its successful records (a rerun skips them) and drops failed ones and
any line cut short by a crash (they are retried), rewriting the file atomically, so the output never
holds two records of one (id, method). Data-parallel runs write one part file per process
(``answers.jsonl.part-3.jsonl``) and merge the parts into the output (``merge_parts``).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dycoke.errors import CsvError

CSV_FIELDS = [
    "id",
    "method",
    "video",
    "question",
    "answer",
    "ground_truth",
    "correct",
    "frames",
    "visual_tokens",
    "prompt_tokens",
    "generated_tokens",
    "ttft_s",
    "ms_per_token",
    "total_s",
    "error",
]


def _csv_row(record: dict[str, Any]) -> dict[str, Any]:
    tokens, timings = record.get("tokens") or {}, record.get("timings_s") or {}
    return {
        "id": record["id"],
        "method": record["method"],
        "video": record["video"],
        "question": record["question"],
        "answer": record["answer"] if record["answer"] is not None else "",
        "ground_truth": record["ground_truth"] or "",
        "correct": "" if record["correct"] is None else str(record["correct"]).lower(),
        "frames": tokens.get("frames", ""),
        "visual_tokens": tokens.get("visual", ""),
        "prompt_tokens": tokens.get("prompt", ""),
        "generated_tokens": tokens.get("generated", ""),
        "ttft_s": timings.get("ttft", ""),
        "ms_per_token": "" if timings.get("ms_per_token") is None else timings["ms_per_token"],
        "total_s": timings.get("total", ""),
        "error": record["error"] or "",
    }


class ResultWriter:
    """Appends records to ``.jsonl`` or ``.csv``, flushed and synced one by one; knows what is done.

    Opening an existing output keeps its successful records (their (id, method) are ``done``) and
    drops failed ones and any line cut short by a crash, rewriting the file atomically when needed.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.format = self.check_path(self.path)
        kept: list[dict[str, Any]] = []
        if self.path.exists() and not overwrite:
            kept, dirty = self._load()
            if dirty:
                self._rewrite(kept)
        elif self.path.exists():
            self.path.unlink()
        self.done: set[tuple[str, str]] = {record_key(r) for r in kept}
        self.kept = kept
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS) if self.format == "csv" else None
        if self._csv is not None and new:
            self._csv.writeheader()
            self._sync()

    @staticmethod
    def check_path(path: Path) -> str:
        """Refuse an output path that cannot be written; return its format."""
        fmt = output_format(path)
        if path.is_dir():
            raise CsvError(f"output path is a directory: {path}")
        if not path.parent.is_dir():
            raise CsvError(f"output folder does not exist: {path.parent}")
        return fmt

    def _load(self) -> tuple[list[dict[str, Any]], bool]:
        """Successful records of the existing file, and whether anything had to be dropped."""
        records, torn = read_records(self.path)
        kept = [r for r in records if not r.get("error")]
        return kept, torn or len(kept) < len(records)

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        write_records(self.path, records)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and make it durable before returning."""
        if self._csv is not None:
            self._csv.writerow(_csv_row(record))
        else:
            self._file.write(json.dumps(record) + "\n")
        self._sync()
        if not record.get("error"):
            self.done.add(record_key(record))

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_format(path: Path) -> str:
    """``jsonl`` or ``csv``, from the file name."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise CsvError(f"output must end in .jsonl or .csv, got '{path.name}'")
    return suffix[1:]


def read_records(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """Every whole record of an output file (failed ones included), and whether a torn or malformed
    line was skipped. A missing file has no records."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8")
    torn = bool(text) and not text.endswith("\n")
    records: list[dict[str, Any]] = []
    if output_format(path) == "jsonl":
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                torn = True
    else:
        for row in csv.DictReader(text.splitlines()):
            if None in row.values() or None in row or not row.get("method"):
                torn = True
                continue
            records.append(row)
    return records, torn


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``path`` with ``records`` atomically (a crash leaves the old file or the new one)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        if output_format(path) == "jsonl":
            for record in records:
                f.write(json.dumps(record) + "\n")
        else:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def record_key(record: dict[str, Any]) -> tuple[str, str]:
    return str(record["id"]), str(record["method"])


def part_path(output: Path, rank: int) -> Path:
    """The part file of process ``rank`` of a data-parallel run, next to the output."""
    return output.with_name(f"{output.name}.part-{rank}{output.suffix}")


def part_paths(output: Path) -> list[Path]:
    """Every part file of ``output`` on disk, from any earlier run and any number of processes."""
    parts = output.parent.glob(f"{output.name}.part-*{output.suffix}")
    return sorted((p for p in parts if p.name.removeprefix(output.name + ".part-").split(".")[0].isdigit()), key=str)


def merge_parts(output: Path) -> int:
    """Merge every part file into ``output`` and delete the parts; returns the records merged in.

    Per (id, method) a successful record wins over failed ones; among failures the latest is kept.
    The output is rewritten atomically before any part is deleted, so a crash loses nothing.
    """
    parts = part_paths(output)
    if not parts:
        return 0
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    added = 0
    for path in [output, *parts]:
        records, _ = read_records(path)
        for record in records:
            key = record_key(record)
            previous = merged.get(key)
            if previous is None:
                added += path != output
                merged[key] = record
            elif previous.get("error"):  # a failure gives way to any later record
                merged[key] = record
    write_records(output, list(merged.values()))
    for path in parts:
        path.unlink()
    return added
