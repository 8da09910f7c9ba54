"""Rendering for the terminal: everything here writes to stderr."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


@contextmanager
def loading(message: str, *, enabled: bool = True) -> Iterator[None]:
    """A spinner on stderr while something slow happens (only on a terminal)."""
    if enabled and console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def warn_random_weights(source: str) -> None:
    console.print(
        f"[yellow]warning:[/] {source} has random weights (a test checkpoint): its answers are meaningless",
        highlight=False,
        soft_wrap=True,
    )


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def per_frame_text(counts: list[int]) -> str:
    """Tokens per frame, compactly: ``196 x 32``, or ``[196, 58, 58, 58] x 7 + [196, 58, 196, 58]``."""
    if not counts:
        return "-"
    parts: list[str] = []
    i = 0
    while i < len(counts):
        best_period, best_repeats = 1, 1
        for period in range(1, min(8, len(counts) - i) + 1):
            unit = counts[i : i + period]
            repeats = 1
            while counts[i + repeats * period : i + (repeats + 1) * period] == unit:
                repeats += 1
            if repeats > 1 and repeats * period > best_repeats * best_period:
                best_period, best_repeats = period, repeats
        unit = counts[i : i + best_period]
        body = str(unit[0]) if best_period == 1 else "[" + ", ".join(map(str, unit)) + "]"
        parts.append(f"{body} x {best_repeats}" if best_repeats > 1 else body)
        i += best_period * best_repeats
    return " + ".join(parts)


def summary_table(report: Any) -> Table:
    """The per-run summary: tokens, time per stage, memory."""
    t, s, m = report.tokens, report.timings_s, report.memory
    table = Table(title=f"dycoke · {report.method}", title_justify="left", show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_column("detail", style="dim")
    video = report.video
    table.add_row("frames", str(t.frames), f"of {video.source_num_frames} at {video.source_fps:.2f} fps")
    table.add_row("visual tokens / frame", per_frame_text(t.visual_per_frame), f"{t.tokens_per_frame} uncompressed")
    share = 100 * t.visual / t.visual_uncompressed if t.visual_uncompressed else 100.0
    table.add_row("visual tokens to LLM", str(t.visual), f"{share:.1f} % of {t.visual_uncompressed}")
    table.add_row("prompt tokens", str(t.prompt), "text + visual")
    table.add_row("generated tokens", str(t.generated), "")
    table.add_section()
    table.add_row("video decode", fmt_s(s.video_decode), f"{video.decoded_size[1]}x{video.decoded_size[0]}")
    table.add_row("preprocess", fmt_s(s.preprocess), "")
    early = video.encoded_while_reading
    during = f"{early} of {t.frames} frames during the decode" if early else ""
    table.add_row("vision encoder", fmt_s(s.vision_encoder), during)
    if s.compress >= 0.0005:
        table.add_row("compression", fmt_s(s.compress), "")
    if s.shared_prefix >= 0.0005:
        table.add_row("prefill of prompt + video", fmt_s(s.shared_prefix), "after the decode" if early else "")
    table.add_row("prefill (LLM first token)", fmt_s(s.prefill), "")
    table.add_row("time to first token", fmt_s(s.ttft), "from the file")
    per_token = f"{s.ms_per_token:.1f} ms/token" if s.ms_per_token is not None else ""
    loop = {"graph": "CUDA graph", "static": "static cache", "hf": "generate"}.get(report.decoder, "")
    per_token = ", ".join(part for part in (per_token, loop) if part)
    table.add_row("decode", fmt_s(s.decode), per_token)
    table.add_row("total", fmt_s(s.total), "the model's work, from the file")
    if s.startup is not None:
        table.add_row("start-up", fmt_s(s.startup), "imports, CUDA initialisation")
    if s.load is not None:
        table.add_row("model load", fmt_s(s.load), "checkpoint to a ready model")
    if s.wall is not None:
        table.add_row("wall clock", fmt_s(s.wall), "from the command to the answer")
    c = report.compression
    if report.method == "dycoke":
        table.add_section()
        table.add_row("TTM: visual tokens", f"{t.visual_uncompressed} -> {t.visual}", f"K={c['merge_ratio']}")
        table.add_row("retained at prefill", f"{100 * c['retained_prefill_ratio']:.1f} %", "tokens entering the LLM")
        table.add_row("paper's final ratio", f"{100 * c['paper_final_ratio']:.2f} %", "(1-3K/4)(1-P)")
        steps = c.get("decode_steps", 0)
        table.add_row("DP: steps that pruned", f"{100 * c['pruned_step_share']:.0f} %", f"of {steps} decode steps")
        if "avg_visual_attended_late_layers" in c:
            table.add_row(
                f"attended, layers >= {c['prune_layer']}",
                f"{c['avg_visual_attended_late_layers']:.0f}",
                "visual tokens per decode step",
            )
    _method_rows(table, report.method, c)
    if "tflops" in c:
        table.add_row("TFLOPs (paper formula)", f"{c['tflops']:.3g}", f"every token: {c['tflops_full']:.3g}")
    if "prefill_tflops" in c:
        table.add_row("prefill TFLOPs", f"{c['prefill_tflops']:.3g}", f"every token: {c['prefill_tflops_full']:.3g}")
    table.add_section()
    table.add_row("device", m.device, m.dtype)
    if m.peak_gpu_bytes is not None:
        table.add_row("peak GPU memory", fmt_bytes(m.peak_gpu_bytes), "")
    full = c.get("kv_bytes_full", m.kv_cache_bytes)
    table.add_row("KV cache stored", fmt_bytes(m.kv_cache_bytes), f"every token: {fmt_bytes(full)}")
    if full != m.kv_cache_bytes:
        table.add_row("KV cache saved", fmt_bytes(c["kv_bytes_saved"]), f"{100 * c['kv_bytes_saved'] / full:.0f} %")
    read = c.get("kv_bytes_attended_per_step", m.kv_cache_bytes)
    if read != m.kv_cache_bytes:
        table.add_row("KV read per step", fmt_bytes(read), f"without DP: {fmt_bytes(m.kv_cache_bytes)}")
    return table


def _method_rows(table: Table, method: str, c: dict[str, Any]) -> None:
    """What the baselines and controls did, each in its own terms."""
    if method == "fastv":
        table.add_section()
        table.add_row(
            f"FastV: kept from layer {c['fastv_layer']}",
            str(c["visual_kept_late_layers"]),
            f"{100 * c['fastv_retained_ratio']:.1f} % of the visual tokens (FastV's ratio)",
        )
    elif method == "prumerge":
        table.add_section()
        label = "PruMerge+" if c.get("prumerge_plus") else "PruMerge"
        table.add_row(f"{label}: retained", f"{100 * c['retained_prefill_ratio']:.1f} %", "tokens entering the LLM")
        table.add_row("IQR outlier ratio", f"{100 * c['iqr_outlier_ratio']:.2f} %", "of the pooled tokens")
    elif method in ("random", "uniform"):
        table.add_section()
        detail = f"seed {c['budget_seed']}" if method == "random" else f"frames {c['frames_kept']}"
        table.add_row("budget (visual tokens)", str(c["budget_tokens"]), detail)


def print_summary(report: Any) -> None:
    console.print(summary_table(report))
    hint = seek_hint(report)
    if hint:
        console.print(f"[cyan]hint:[/] {hint}", highlight=False, soft_wrap=True)


def seek_hint(report: Any) -> str | None:
    """A suggestion to try ``--seek keyframe`` when an exact read took over 1 s and reading the nearest
    key frames would have decoded at least 3x fewer frames."""
    video, decode_s = report.video, report.timings_s.video_decode
    exact = video.decode_cost.get("exact_frames_decoded", 0)
    keyframe = video.decode_cost.get("keyframe_frames_decoded", 0)
    if video.seek != "exact" or decode_s <= 1.0 or keyframe <= 0 or exact < 3 * keyframe:
        return None
    return (
        f"reading the frames took {decode_s:.1f} s; --seek keyframe would decode about {exact / keyframe:.0f}x "
        "fewer frames (nearest key frames instead of the exact sampled ones)"
    )


def print_comparison(result: Any) -> None:
    """One table: a column per method, each figure with its ratio to the baseline."""
    metrics, ratios = result.metrics(), result.ratios()
    names = list(result.reports)
    table = Table(title=f"dycoke · compare (ratios vs {result.baseline})", title_justify="left", box=None)
    table.add_column("", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    rows: list[tuple[str, str, Callable[[Any], str]]] = [
        ("visual tokens", "visual_tokens", str),
        ("prompt tokens", "prompt_tokens", str),
        ("generated tokens", "generated_tokens", str),
        ("prefill", "prefill_s", fmt_s),
        ("time to first token", "ttft_s", fmt_s),
        ("ms per token", "ms_per_token", lambda v: f"{v:.1f}"),
        ("total", "total_s", fmt_s),
        ("peak GPU memory", "peak_gpu_bytes", fmt_bytes),
        ("KV cache", "kv_cache_bytes", fmt_bytes),
        ("TFLOPs (paper formula)", "tflops", lambda v: f"{v:.3g}"),
    ]
    for label, key, fmt in rows:
        cells = []
        for name in names:
            value, ratio = metrics[name][key], ratios[name][key]
            if value is None:
                cells.append("-")
            elif name == result.baseline or ratio is None:
                cells.append(fmt(value))
            else:
                cells.append(f"{fmt(value)} ({ratio:.2f}x)")
        table.add_row(label, *cells)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@contextmanager
def batch_progress(total: int, *, enabled: bool = True, label: str = "") -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on stderr (done/total, questions per second, ETA, failures); yields the
    callback that advances it by one record."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    failures = 0
    progress = Progress(
        TextColumn(f"[bold]{label}answering"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[failed]}"),
        console=console,
        disable=not enabled,
    )
    task = progress.add_task("batch", total=total, rate="", failed="")
    started = time.perf_counter()

    def advance(record: dict[str, Any]) -> None:
        nonlocal failures
        failures += bool(record.get("error"))
        done = progress.tasks[0].completed + 1
        rate = done / max(time.perf_counter() - started, 1e-9)
        failed = f"[red]{failures} failed" if failures else ""
        progress.update(task, advance=1, rate=f"{rate:.2f} q/s", failed=failed)
        if record.get("error") and enabled:
            progress.console.print(
                f"[yellow]failed:[/] {record['id']} ({record['method']}): {record['error']}",
                highlight=False,
                soft_wrap=True,
            )

    with progress:
        yield advance


def print_batch_summary(summary: Any, path: Any) -> None:
    done = summary.already_done + summary.answered
    console.print(
        f"{done}/{summary.total} answered ({summary.answered} now, {summary.already_done} before), "
        f"{summary.failed} failed, in {summary.seconds:.1f} s -> {path}",
        highlight=False,
        soft_wrap=True,
    )
    for method, accuracy in summary.accuracy().items():
        graded = summary.graded[method]
        console.print(
            f"accuracy ({method}): {100 * accuracy:.1f} % of {graded} questions with a ground truth",
            highlight=False,
            soft_wrap=True,
        )
