"""What the commands share: the one-line error and exit codes, the process clock, the video check, and
loading a model while the video decodes."""

from __future__ import annotations

import os
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
    """When this process started (seconds since the epoch, to the kernel's clock tick): the origin of
    ``startup`` and ``wall``. On Linux from the process's start in ticks since boot
    (``/proc/self/stat``) against the boot-time clock now; psutil's ``create_time`` adds those ticks to
    the boot time in whole seconds, which put the start up to a second early (the reports' wall clock
    was 0.4-0.8 s longer than the one measured around the process on the H200 machine). Elsewhere the
    CLI module's import."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks since boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc, or no boot-time clock
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
