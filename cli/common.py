"""What the commands share: the one-line error and exit codes, the process clock, the video check, and
loading a model while the video decodes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer

from dycoke.config import ModelOptions, RunOptions
from dycoke.errors import ConfigError

EXIT_USAGE = 2
_IMPORTED_AT = time.time()


def process_start() -> float:
    """When this process started (seconds since the epoch): the origin of ``startup`` and ``wall``."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil or no /proc: the CLI module's import is the next best origin
        return _IMPORTED_AT


def fail(exc: Exception) -> NoReturn:
    """Print one ``Error: ...`` line on stderr and exit: 2 for bad option values, 1 otherwise."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE if isinstance(exc, ConfigError) else 1)


EXIT_SOME_FAILED = 3


def write(text: str) -> None:
    """Stream answer text to stdout as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def check_video_path(video: str) -> None:
    """Cheap checks before any heavy import, so a typo is reported at once."""
    from dycoke.errors import VideoError

    path = Path(video)
    if not path.exists():
        raise VideoError(f"video not found: {video}")
    if path.is_dir():
        raise VideoError(f"video path is a directory, not a file: {video}")


def load_model_overlapped(model_options: ModelOptions, *, check: Callable[[], None] | None = None) -> tuple[Any, float]:
    """The imports with the weights read meanwhile (``dycoke.startup.import_while_reading_weights``), then
    the model load. ``check`` runs once torch is imported, before the read starts (a video error fails
    first). Returns the model and the start-up seconds (process start to the model load: imports, CUDA
    initialisation)."""
    from dycoke.startup import import_while_reading_weights

    weights = import_while_reading_weights(model_options, check)
    startup = time.time() - process_start()
    from dycoke.pipeline import VideoQA

    return VideoQA.load(model_options, weights=weights), startup


def load_for_video(video: str, model_options: ModelOptions, options: RunOptions) -> tuple[Any, Any, float]:
    """Decode the video in a forked child (``dycoke.reading``) while the model loads
    (``load_model_overlapped``); a bad file fails before the model loads. Returns the model, the decoded
    video and the start-up seconds."""
    from cli.render import loading, warn_random_weights
    from dycoke.reading import start_reading

    reading = start_reading(video, options.video, separate_process=True)

    def video_error_first() -> None:
        if reading.done():
            reading.result()  # raises the video's error before any loading

    with loading(f"Loading {model_options.model}"):
        qa, startup = load_model_overlapped(model_options, check=video_error_first)
    with loading(f"Reading {video}"):
        decoded = reading.result()
    options.method.check_against_model(qa.loaded.num_layers)
    if qa.loaded.random_weights:
        warn_random_weights(qa.loaded.source)
    return qa, decoded, startup
