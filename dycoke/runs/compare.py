"""Several methods on one question, measured under the same conditions.

The video is decoded, preprocessed and encoded once; every method then answers from the same features.
On CUDA each method first runs a short warm-up (kernels, allocator), and peak-memory statistics are
reset before each measured run; every stage is synchronised. Figures that cannot be compared are
named in ``Comparison.notes`` (no GPU memory on a CPU; totals when answer lengths differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from dycoke.config import METHODS, Method, RunOptions, needs_vision_signals
from dycoke.errors import ConfigError
from dycoke.pipeline import DecodedVideo, VideoQA
from dycoke.report import Report

DEFAULT_COMPARE: tuple[Method, ...] = ("full", "dycoke")

METRICS: dict[str, Callable[[Report], float | int | None]] = {
    "visual_tokens": lambda r: r.tokens.visual,
    "prompt_tokens": lambda r: r.tokens.prompt,
    "generated_tokens": lambda r: r.tokens.generated,
    "prefill_s": lambda r: r.timings_s.prefill,
    "ttft_s": lambda r: r.timings_s.ttft,
    "ms_per_token": lambda r: r.timings_s.ms_per_token,
    "total_s": lambda r: r.timings_s.total,
    "peak_gpu_bytes": lambda r: r.memory.peak_gpu_bytes,
    "kv_cache_bytes": lambda r: r.memory.kv_cache_bytes,
    "tflops": lambda r: r.compression.get("tflops"),
}


def parse_methods(text: str | None) -> list[Method]:
    """``"full,dycoke"`` -> ``["full", "dycoke"]``; None or empty -> the default pair."""
    if not text:
        return list(DEFAULT_COMPARE)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"compare: unknown method '{unknown[0]}'; allowed: {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: each method once, got '{text}'")
    if len(names) < 2:
        raise ConfigError(f"compare needs at least two methods (e.g. full,dycoke), got '{text}'")
    return [cast(Method, n) for n in names]


@dataclass
class Comparison:
    """One question answered by several methods. ``baseline`` is ``full`` when present, else the first."""

    question: str
    reports: dict[str, Report]
    baseline: str
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, dict[str, float | int | None]]:
        """Per method, the compared figures."""
        return {name: {key: get(report) for key, get in METRICS.items()} for name, report in self.reports.items()}

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """Per method, each figure divided by the baseline's (None where either is missing or zero)."""
        metrics = self.metrics()
        base = metrics[self.baseline]
        out: dict[str, dict[str, float | None]] = {}
        for name, values in metrics.items():
            out[name] = {}
            for key, value in values.items():
                b = base[key]
                out[name][key] = None if value is None or not b else float(value) / float(b)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "baseline": self.baseline,
            "methods": list(self.reports),
            "notes": list(self.notes),
            "metrics": self.metrics(),
            "ratios": self.ratios(),
            "reports": {name: report.to_dict() for name, report in self.reports.items()},
        }


def compare(
    qa: VideoQA,
    video: str | Path | DecodedVideo,
    question: str,
    options: RunOptions,
    methods: list[Method],
    *,
    record: bool = False,
) -> Comparison:
    """Answer ``question`` with each method on the same decoded and encoded video (``record``: keep
    each method's ``Report.trace`` for a drawing)."""
    loaded = qa.loaded
    for name in methods:
        replace(options.method, method=name).check_against_model(loaded.num_layers)
    prepared = qa.prepare(video, options.video, with_signals=needs_vision_signals(list(methods)))
    per_method = {name: replace(options, method=replace(options.method, method=name)) for name in methods}
    on_gpu = loaded.device.type == "cuda"
    if on_gpu:
        warm_gen = replace(options.generation, max_new_tokens=2, min_new_tokens=0)
        for run in per_method.values():
            qa.answer(prepared, question, replace(run, generation=warm_gen))
    reports: dict[str, Report] = {
        name: qa.answer(prepared, question, run, record=record) for name, run in per_method.items()
    }
    notes: list[str] = []
    if not on_gpu:
        notes.append(f"on {loaded.device.type}: no GPU memory figures; CPU timings do not predict GPU ones")
    lengths = {r.tokens.generated for r in reports.values()}
    if len(lengths) > 1:
        notes.append("answers differ in length: compare ms/token, not decode or total time")
    baseline = "full" if "full" in reports else methods[0]
    return Comparison(question=question, reports=reports, baseline=baseline, notes=notes)
