"""The benchmarks' fresh processes import from compiled bytecode, as a user's pip install does.

The GPU machine's Python sets ``PYTHONDONTWRITEBYTECODE=1`` and its torch and sympy ship without
``__pycache__``, so every fresh process there compiles their sources again: ``import torch,
transformers`` took 7-8 s as found against 3.4 s from bytecode (H200, 2026-12-02). A pip install
writes the bytecode at install time, so the benchmarks time fresh processes with a
``PYTHONPYCACHEPREFIX`` cache (filled by an untimed first run) unless told ``--bytecode as-found``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_bytecode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bytecode",
        choices=["cached", "as-found"],
        default="cached",
        help="cached (default): fresh processes import from compiled bytecode, as after a pip install, even "
        "where the environment forbids writing it (a PYTHONPYCACHEPREFIX cache, filled by an untimed run "
        "first); as-found: the environment as is",
    )


def child_environment(mode: str, cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, with ``extra`` added; with ``mode == "cached"`` the
    child writes and reads its bytecode under ``cache``."""
    environment = {**os.environ, **(extra or {})}
    if mode == "cached":
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        environment["PYTHONPYCACHEPREFIX"] = str(cache.resolve())
    return environment


def describe(mode: str) -> dict[str, object]:
    """What the result files record about bytecode: the mode and how the environment was found."""
    import torch

    return {
        "bytecode": mode,
        "environment_writes_bytecode": not sys.dont_write_bytecode,
        "torch_ships_bytecode": (Path(torch.__file__).parent / "__pycache__").is_dir(),
    }
