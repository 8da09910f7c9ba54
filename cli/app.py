"""The ``dycoke`` command: a thin Typer client of the library.

The answer goes to stdout; progress, warnings and the summary go to stderr. torch and transformers
are imported only inside commands that need them, so ``dycoke --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import options as o
from cli import serving
from cli.common import EXIT_SOME_FAILED, check_video_path, fail, load_for_video, load_model_overlapped, process_start
from dycoke import __version__
from dycoke.config import DEFAULT_MODEL, PAPER_SYSTEM_PROMPT, ModelOptions, RunOptions
from dycoke.errors import ConfigError, DyCokeError

app = typer.Typer(
    name="dycoke",
    help="Ask questions about videos with LLaVA-OneVision, made fast with DyCoke token compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dycoke {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Ask questions about videos with LLaVA-OneVision, made fast with DyCoke token compression."""


@app.command()
def ask(
    video: Annotated[str, typer.Argument(help="Video file (anything ffmpeg reads: mp4, mkv, avi, webm, ...).")],
    question: Annotated[str, typer.Argument(help="The question about the video.")],
    model: o.Model = DEFAULT_MODEL,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    device_map: o.DeviceMap = None,
    max_gpu_memory: o.MaxGpuMemory = None,
    frames: o.Frames = 32,
    fps: o.Fps = None,
    max_frames: o.MaxFrames = 64,
    start: o.Start = None,
    end: o.End = None,
    seek: o.Seek = "exact",
    method: o.MethodName = "dycoke",
    merge_ratio: o.MergeRatio = 0.7,
    prune_layer: o.PruneLayer = 3,
    prune_ratio: o.PruneRatio = 0.7,
    gate_threshold: o.GateThreshold = 0.9,
    gate_mode: o.GateMode = "official",
    similarity: o.Similarity = "fp32",
    prune_last_window: o.PruneLastWindow = False,
    keep_odd_last_frame: o.KeepOddLastFrame = False,
    dp_evict: o.DpEvict = False,
    fastv_layer: o.FastvLayer = 2,
    fastv_keep: o.FastvKeep = 0.35,
    prumerge_plus: o.PrumergePlus = False,
    budget_tokens: o.BudgetTokens = None,
    budget_ratio: o.BudgetRatio = None,
    budget_seed: o.BudgetSeed = 0,
    max_new_tokens: o.MaxNewTokens = 256,
    min_new_tokens: o.MinNewTokens = 0,
    sample: o.Sample = False,
    temperature: o.Temperature = 1.0,
    top_p: o.TopP = 1.0,
    top_k: o.TopK = 0,
    seed: o.Seed = None,
    decoder: o.Decoder = "auto",
    fused_step: o.FusedStep = True,
    prompt: o.Prompt = "paper",
    system: o.System = PAPER_SYSTEM_PROMPT,
    compare: o.Compare = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    show_tokens: Annotated[
        Path | None,
        typer.Option("--show-tokens", help="Write a PNG of what the method kept (frames, and DyCoke's decode steps)."),
    ] = None,
    server: o.Server = None,
    api_key: o.ApiKey = None,
    upload: o.Upload = False,
) -> None:
    """Answer QUESTION about VIDEO; the answer streams to stdout, a summary follows on stderr."""
    try:
        model_options, run_options = o.options_from(locals())
        if not question.strip():
            raise ConfigError("question must not be empty")
        check_video_path(video)
        if show_tokens is not None:
            _check_png_path(show_tokens)
        if server:
            if compare is not None or show_tokens is not None:
                raise ConfigError("--compare and --show-tokens run in-process: drop --server (or DYCOKE_SERVER)")
            report = serving.run_remote(video, [("user", question)], server, api_key, run_options, upload, as_json)
        elif compare is not None:
            from dycoke.runs.compare import parse_methods

            methods = parse_methods(compare)
            _run_compare(
                video, question, model_options, run_options, methods, as_json=as_json, quiet=quiet, picture=show_tokens
            )
            return
        else:
            report = _run_ask(video, question, model_options, run_options, as_json=as_json, picture=show_tokens)
    except DyCokeError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo("Error: interrupted", err=True)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        from cli.render import print_summary

        print_summary(report)


def _check_png_path(path: Path) -> None:
    if path.suffix.lower() != ".png":
        raise ConfigError(f"show-tokens must name a .png file, got '{path.name}'")
    if not path.parent.is_dir():
        raise ConfigError(f"show-tokens: folder does not exist: {path.parent}")


def _run_ask(
    video: str,
    question: str,
    model_options: ModelOptions,
    options: RunOptions,
    *,
    as_json: bool,
    picture: Path | None = None,
) -> Any:
    from cli.render import console

    qa, decoded, startup = load_for_video(video, model_options, options)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    report = qa.ask(decoded, question, options, on_text=None if as_json else write, record=picture is not None)
    report.timings_s.startup, report.timings_s.wall = startup, time.time() - process_start()
    if picture is not None and report.trace is not None:
        from dycoke.visualize import save_png

        save_png([report.trace], picture, [f"{report.method} · {question}"])
        console.print(f"what {report.method} kept: {picture}", highlight=False, soft_wrap=True)
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    for warning in report.video.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return report


def _run_compare(
    video: str,
    question: str,
    model_options: ModelOptions,
    options: RunOptions,
    methods: list[Any],
    *,
    as_json: bool,
    quiet: bool,
    picture: Path | None = None,
) -> None:
    from cli.render import console, loading, print_comparison
    from dycoke.runs.compare import compare

    qa, decoded, startup = load_for_video(video, model_options, options)
    with loading(f"Comparing {', '.join(methods)}"):
        result = compare(qa, decoded, question, options, methods, record=picture is not None)
    for report in result.reports.values():
        report.timings_s.startup = startup
    if picture is not None:
        from dycoke.visualize import save_png

        traces = [r.trace for r in result.reports.values() if r.trace is not None]
        save_png(traces, picture, [f"{name} · {question}" for name in result.reports])
        console.print(f"what each method kept: {picture}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for name, report in result.reports.items():
        typer.echo(f"[{name}] {report.answer}")
    if not quiet:
        print_comparison(result)


@app.command()
def batch(
    questions: Annotated[str, typer.Argument(help="CSV with columns video, question (optional: id, options, answer).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output file, .jsonl or .csv; a rerun resumes it.")],
    overwrite: Annotated[bool, typer.Option(help="Start the output over instead of resuming it.")] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Questions on one video generated together (left-padded).")
    ] = 1,
    share_prefix: Annotated[
        bool,
        typer.Option(
            "--share-prefix/--no-share-prefix",
            help="Prefill the system prompt + video once per video and method, reused by every question.",
        ),
    ] = True,
    prefill_rows: o.PrefillRows = 16,
    model: o.Model = DEFAULT_MODEL,
    device: o.Device = "auto",
    dtype: o.Dtype = "auto",
    device_map: o.DeviceMap = None,
    max_gpu_memory: o.MaxGpuMemory = None,
    frames: o.Frames = 32,
    fps: o.Fps = None,
    max_frames: o.MaxFrames = 64,
    start: o.Start = None,
    end: o.End = None,
    seek: o.Seek = "exact",
    method: o.MethodName = "dycoke",
    merge_ratio: o.MergeRatio = 0.7,
    prune_layer: o.PruneLayer = 3,
    prune_ratio: o.PruneRatio = 0.7,
    gate_threshold: o.GateThreshold = 0.9,
    gate_mode: o.GateMode = "official",
    similarity: o.Similarity = "fp32",
    prune_last_window: o.PruneLastWindow = False,
    keep_odd_last_frame: o.KeepOddLastFrame = False,
    dp_evict: o.DpEvict = False,
    fastv_layer: o.FastvLayer = 2,
    fastv_keep: o.FastvKeep = 0.35,
    prumerge_plus: o.PrumergePlus = False,
    budget_tokens: o.BudgetTokens = None,
    budget_ratio: o.BudgetRatio = None,
    budget_seed: o.BudgetSeed = 0,
    max_new_tokens: o.MaxNewTokens = 256,
    min_new_tokens: o.MinNewTokens = 0,
    sample: o.Sample = False,
    temperature: o.Temperature = 1.0,
    top_p: o.TopP = 1.0,
    top_k: o.TopK = 0,
    seed: o.Seed = None,
    decoder: o.Decoder = "auto",
    fused_step: o.FusedStep = True,
    prompt: o.Prompt = "paper",
    system: o.System = PAPER_SYSTEM_PROMPT,
    compare: o.Compare = None,
    quiet: o.Quiet = False,
    show_tokens_dir: Annotated[
        Path | None,
        typer.Option("--show-tokens-dir", help="Folder for <id>.<method>.png: what the method kept for each row."),
    ] = None,
) -> None:
    """Answer every question of a CSV file; records are written as they complete, a rerun resumes.

    Exit code 0 when every row succeeded, 3 when some rows failed (their records carry the error),
    1 on a fatal error (unreadable CSV, model not loadable), 2 on a bad option value.
    """
    try:
        model_options, run_options = o.options_from(locals())
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        if show_tokens_dir is not None and not show_tokens_dir.is_dir():
            raise ConfigError(f"show-tokens-dir must be an existing folder, got '{show_tokens_dir}'")
        from dycoke.runs.batch import read_questions
        from dycoke.runs.compare import parse_methods
        from dycoke.runs.results import ResultWriter

        methods = parse_methods(compare) if compare is not None else [run_options.method.method]
        rows = read_questions(questions)
        ResultWriter.check_path(Path(out))
        summary = _run_batch(
            rows,
            out,
            overwrite,
            model_options,
            run_options,
            methods,
            quiet=quiet,
            batch_size=batch_size,
            share_prefix=share_prefix,
            pictures=show_tokens_dir,
        )
    except DyCokeError as exc:
        fail(exc)
    except KeyboardInterrupt:
        typer.echo(f"Error: interrupted; answers so far are in {out}, rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    if summary.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _run_batch(
    rows: list[Any],
    out: str,
    overwrite: bool,
    model_options: ModelOptions,
    options: RunOptions,
    methods: list[Any],
    *,
    quiet: bool,
    batch_size: int,
    share_prefix: bool,
    pictures: Path | None = None,
) -> Any:
    """Alone, or as one process of ``accelerate launch``/``torchrun`` (WORLD_SIZE > 1)."""
    from cli.render import batch_progress, loading, print_batch_summary, warn_random_weights
    from dycoke.runs.batch import BatchSummary, run_batch
    from dycoke.runs.parallel import Shard, current_shard, process_device, run_sharded

    shard = Shard()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        cuda = torch.cuda.is_available()
        shard = current_shard(use_cpu=model_options.device == "cpu" or not cuda)
        device = process_device(model_options.device, model_options.device_map, shard, cuda)
        model_options = replace(model_options, device=device)
    show = not quiet and shard.is_main

    def answer_share(share: list[Any], writer: Any) -> Any:
        total = len(share) * len(methods)
        todo = total - sum(1 for q in share for m in methods if (q.id, m) in writer.done)
        if todo == 0:
            return BatchSummary(total=total, already_done=total)
        with loading(f"Loading {model_options.model}", enabled=show):
            qa, _ = load_model_overlapped(model_options)  # the weights onto this process's GPU
        for m in methods:
            replace(options.method, method=m).check_against_model(qa.loaded.num_layers)
        if qa.loaded.random_weights and shard.is_main:
            warn_random_weights(qa.loaded.source)
        label = f"process {shard.rank + 1} of {shard.world}: " if shard.world > 1 else ""
        with batch_progress(todo, enabled=show, label=label) as advance:
            return run_batch(
                qa,
                share,
                options,
                methods,
                writer,
                on_record=advance,
                batch_size=batch_size,
                share_prefix=share_prefix,
                pictures=pictures,
            )

    summary = run_sharded(rows, methods, out, shard, answer_share, overwrite=overwrite)
    if show:
        print_batch_summary(summary, Path(out))
    return summary


app.command()(serving.serve)
app.command()(serving.chat)


@app.command("make-tiny-model")
def make_tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Decoder layers of the tiny LLM.")] = 4,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing checkpoint in DIRECTORY.")] = False,
) -> None:
    """Write a tiny random-weight LLaVA-OneVision checkpoint (real on-disk format) to try the tool offline.

    Its answers are meaningless: it exists to run the whole pipeline without downloading weights.
    """
    try:
        if layers < 1:
            raise ConfigError(f"layers must be a positive integer, got {layers}")
        from dycoke.tiny import build_tiny_checkpoint

        path = build_tiny_checkpoint(directory, seed=seed, text_layers=layers, overwrite=overwrite)
    except DyCokeError as exc:
        fail(exc)
    typer.echo(str(path))
    typer.echo(f"tiny random-weight checkpoint written; try: dycoke ask VIDEO QUESTION --model {path}", err=True)


def optional_value_args(argv: list[str], option: str = "--compare", default: str = "full,dycoke") -> list[str]:
    """Let ``--compare`` stand alone: give it its default value when no value follows it."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == option and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append(default)
    return out


def main() -> None:
    """Console-script entry point."""
    try:
        app(args=optional_value_args(sys.argv[1:]), prog_name="dycoke")
    except SystemExit as exc:
        if exc.code in (0, None) and "torch" in sys.modules:
            exit_at_once()
        raise


def exit_at_once() -> None:
    """End a successful command that loaded torch without the interpreter's teardown (what mypy does):
    the CUDA context, hundreds of thousands of objects and every module's finalisation would otherwise
    keep the user waiting after the last line is printed. Output is flushed first; every file the
    command writes is closed by then (batch results are written and flushed row by row)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (``| head``), a closed stream
            stream.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
