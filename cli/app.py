"""The ``dycoke`` command: a thin Typer client of the library.

The answer goes to stdout; progress, warnings and the summary go to stderr. torch and transformers
are imported only inside commands that need them, so ``dycoke --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from dycoke import __version__
from dycoke.config import (
    DEFAULT_MODEL,
    PAPER_SYSTEM_PROMPT,
    GenerationOptions,
    MethodOptions,
    ModelOptions,
    PromptOptions,
    RunOptions,
    VideoOptions,
)
from dycoke.errors import ConfigError, DyCokeError

app = typer.Typer(
    name="dycoke",
    help="Ask questions about videos with LLaVA-OneVision, made fast with DyCoke token compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_USAGE = 2


def fail(exc: Exception) -> NoReturn:
    """Print one ``Error: ...`` line on stderr and exit: 2 for bad option values, 1 otherwise."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE if isinstance(exc, ConfigError) else 1)


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


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id or local checkpoint directory.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="'auto' spreads a large model over all visible GPUs.")
]


@app.command()
def ask(
    video: Annotated[str, typer.Argument(help="Video file (anything ffmpeg reads: mp4, mkv, avi, webm, ...).")],
    question: Annotated[str, typer.Argument(help="The question about the video.")],
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    frames: Annotated[int, typer.Option("--frames", "-f", help="Frames sampled uniformly (the paper uses 32).")] = 32,
    fps: Annotated[float | None, typer.Option(help="Sample at this rate instead (capped by --max-frames).")] = None,
    max_frames: Annotated[int, typer.Option(help="Cap on frames with --fps.")] = 64,
    start: Annotated[float | None, typer.Option(help="Start of the time window, seconds.")] = None,
    end: Annotated[float | None, typer.Option(help="End of the time window, seconds.")] = None,
    method: Annotated[str, typer.Option(help="dycoke (compressed) or full (every visual token).")] = "dycoke",
    merge_ratio: Annotated[
        float, typer.Option("--merge-ratio", "-K", help="DyCoke K: share of tokens TTM drops from merged frames.")
    ] = 0.7,
    prune_layer: Annotated[
        int, typer.Option("--prune-layer", "-L", help="DyCoke L: layers from L on attend to the kept KV only.")
    ] = 3,
    prune_ratio: Annotated[
        float, typer.Option("--prune-ratio", "-P", help="DyCoke P: share of visual KV pruned at a decode step.")
    ] = 0.7,
    gate_threshold: Annotated[float, typer.Option(help="Prune when attention moved: cosine below this.")] = 0.9,
    gate_mode: Annotated[
        str, typer.Option(help="official (stable step: prune nothing) or reuse (keep the last selection).")
    ] = "official",
    similarity: Annotated[str, typer.Option(help="TTM similarities in fp32 (default) or the model dtype.")] = "fp32",
    prune_last_window: Annotated[
        bool, typer.Option(help="TTM: also re-prune the last 4-frame window (the reference skips it).")
    ] = False,
    keep_odd_last_frame: Annotated[
        bool, typer.Option(help="TTM: keep an odd last frame whole (the reference drops it).")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    min_new_tokens: Annotated[int, typer.Option(help="Force at least this many tokens (benchmarks).")] = 0,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (with --sample).")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling, 0 = off (with --sample).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    prompt: Annotated[str, typer.Option(help="paper (the paper's evaluation prompt) or checkpoint (its template).")] = (
        "paper"
    ),
    system: Annotated[str, typer.Option(help="System prompt of the paper style.")] = PAPER_SYSTEM_PROMPT,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            metavar="[METHODS]",
            help="Run several methods on the same frames (default full,dycoke) and compare them.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary table on stderr.")] = False,
) -> None:
    """Answer QUESTION about VIDEO; the answer streams to stdout, a summary follows on stderr."""
    try:
        model_options = ModelOptions(model=model, device=device, dtype=dtype, device_map=device_map)
        run_options = RunOptions(
            video=VideoOptions(num_frames=frames, fps=fps, max_frames=max_frames, start_s=start, end_s=end),
            generation=GenerationOptions(
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=sample,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
            ),
            prompt=PromptOptions(style=prompt, system_prompt=system),  # type: ignore[arg-type]
            method=MethodOptions(
                method=method,  # type: ignore[arg-type]
                merge_ratio=merge_ratio,
                prune_layer=prune_layer,
                prune_ratio=prune_ratio,
                gate_threshold=gate_threshold,
                gate_mode=gate_mode,  # type: ignore[arg-type]
                similarity_fp32=_similarity_fp32(similarity),
                prune_last_window=prune_last_window,
                keep_odd_last_frame=keep_odd_last_frame,
            ),
        )
        if not question.strip():
            raise ConfigError("question must not be empty")
        _check_video_path(video)
        if compare is not None:
            from dycoke.compare import parse_methods

            methods = parse_methods(compare)
            _run_compare(video, question, model_options, run_options, methods, as_json=as_json, quiet=quiet)
            return
        report = _run_ask(video, question, model_options, run_options, as_json=as_json)
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


def _similarity_fp32(value: str) -> bool:
    if value not in ("fp32", "model"):
        raise ConfigError(f"similarity must be 'fp32' or 'model', got '{value}'")
    return value == "fp32"


def _check_video_path(video: str) -> None:
    """Cheap checks before any heavy import, so a typo is reported at once."""
    from dycoke.errors import VideoError

    path = Path(video)
    if not path.exists():
        raise VideoError(f"video not found: {video}")
    if path.is_dir():
        raise VideoError(f"video path is a directory, not a file: {video}")


def _run_ask(video: str, question: str, model_options: ModelOptions, options: RunOptions, *, as_json: bool) -> Any:
    from cli.render import console

    qa, decoded = _load(video, model_options, options)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    report = qa.ask(decoded, question, options, on_text=None if as_json else write)
    if not as_json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    for warning in report.video.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    return report


def _load(video: str, model_options: ModelOptions, options: RunOptions) -> tuple[Any, Any]:
    """Read the video (bad files fail before the slow part), then load and check the model."""
    from cli.render import loading, warn_random_weights

    with loading(f"Reading {video}"):
        from dycoke.pipeline import VideoQA, decode_video

        decoded = decode_video(video, options.video)
    with loading(f"Loading {model_options.model}"):
        qa = VideoQA.load(model_options)
    options.method.check_against_model(qa.loaded.num_layers)
    if qa.loaded.random_weights:
        warn_random_weights(qa.loaded.source)
    return qa, decoded


def _run_compare(
    video: str,
    question: str,
    model_options: ModelOptions,
    options: RunOptions,
    methods: list[Any],
    *,
    as_json: bool,
    quiet: bool,
) -> None:
    from cli.render import loading, print_comparison
    from dycoke.compare import compare

    qa, decoded = _load(video, model_options, options)
    with loading(f"Comparing {', '.join(methods)}"):
        result = compare(qa, decoded, question, options, methods)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    for name, report in result.reports.items():
        typer.echo(f"[{name}] {report.answer}")
    if not quiet:
        print_comparison(result)


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
    app(args=optional_value_args(sys.argv[1:]), prog_name="dycoke")


if __name__ == "__main__":
    main()
