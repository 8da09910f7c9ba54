"""CLI behaviour that needs no model: help, version, usage errors, bad paths."""

from __future__ import annotations

import io
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_help_lists_commands() -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "ask" in out and "make-tiny-model" in out


def test_version() -> None:
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("dycoke ")


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from cli.app import app; "
        "import typer.testing as t; r = t.CliRunner().invoke(app, ['ask', '--help']); "
        "assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--frames", "0"], "frames must be a positive integer, got 0"),
        (["--frames", "-3"], "frames must be a positive integer, got -3"),
        (["--device", "gpu7"], "device must be auto, cpu, cuda or cuda:N, got 'gpu7'"),
        (["--dtype", "int8"], "dtype must be one of auto, float32, bfloat16, float16, got 'int8'"),
        (["--fps", "0"], "fps must be a positive number, got 0.0"),
        (["--start", "5", "--end", "2"], "end must be greater than start (5.0 s), got 2.0"),
        (["--max-new-tokens", "0"], "max-new-tokens must be a positive integer, got 0"),
        (["--method", "zip"], "method must be one of"),
        (["--prompt", "fancy"], "prompt must be 'paper' or 'checkpoint', got 'fancy'"),
        (["--top-p", "1.5"], "top-p must be in (0.0, 1.0], got 1.5"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    code, out, err = run("ask", str(video), "q?", *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], err


def test_missing_video_is_one_line_error(tmp_path: Path) -> None:
    code, out, err = run("ask", str(tmp_path / "nope.mp4"), "q?")
    assert code == 1 and out == ""
    assert err.strip() == f"Error: video not found: {tmp_path / 'nope.mp4'}"


def test_directory_as_video(tmp_path: Path) -> None:
    code, _, err = run("ask", str(tmp_path), "q?")
    assert code == 1 and err.strip() == f"Error: video path is a directory, not a file: {tmp_path}"


def test_empty_question(tmp_path: Path) -> None:
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    code, _, err = run("ask", str(video), "   ")
    assert code == 2 and err.strip() == "Error: question must not be empty"


def test_a_slow_exact_read_suggests_keyframe_seeking_once() -> None:
    from types import SimpleNamespace

    from cli.render import seek_hint

    def report(seek: str, decode_s: float, exact: int, keyframe: int) -> SimpleNamespace:
        cost = {"exact_frames_decoded": exact, "keyframe_frames_decoded": keyframe}
        return SimpleNamespace(
            video=SimpleNamespace(seek=seek, decode_cost=cost), timings_s=SimpleNamespace(video_decode=decode_s)
        )

    hint = seek_hint(report("exact", 2.5, 3000, 32))
    assert hint is not None and "2.5 s" in hint and "--seek keyframe" in hint and "94x" in hint
    assert seek_hint(report("exact", 0.9, 3000, 32)) is None  # fast enough
    assert seek_hint(report("exact", 2.5, 90, 32)) is None  # under 3x cheaper
    assert seek_hint(report("keyframe", 2.5, 3000, 32)) is None  # already asked for


@pytest.mark.parametrize(
    "code,torch_loaded,fast", [(0, True, True), (None, True, True), (1, True, False), (0, False, False)]
)
def test_only_a_successful_command_that_loaded_torch_skips_the_teardown(
    monkeypatch: pytest.MonkeyPatch, code: int | None, torch_loaded: bool, fast: bool
) -> None:
    import cli.app as cli_app

    def command(**kwargs: object) -> None:
        raise SystemExit(code)

    exits: list[int] = []
    monkeypatch.setattr(cli_app, "app", command)
    monkeypatch.setattr(cli_app.os, "_exit", exits.append)
    if torch_loaded:
        monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch", types.ModuleType("torch")))
    else:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    with pytest.raises(SystemExit) as raised:  # os._exit is recorded here instead of ending pytest
        cli_app.main()
    assert raised.value.code == code
    assert exits == ([0] if fast else [])


def test_the_summary_says_what_ran_during_the_decode() -> None:
    from dataclasses import replace

    from rich.console import Console

    from cli.render import summary_table
    from tests.server_helpers import _fake_report

    def shown(report: Any) -> str:
        console = Console(width=160, record=True, file=io.StringIO())
        console.print(summary_table(report))
        return console.export_text()

    plain = replace(_fake_report("a", 1), method="full")
    assert "during the decode" not in shown(plain) and "prompt + video" not in shown(plain)
    streamed = replace(
        plain,
        video=replace(plain.video, encoded_while_reading=1),
        timings_s=replace(plain.timings_s, shared_prefix=0.04),
    )
    text = shown(streamed)
    assert "1 of 1 frames during the decode" in text
    assert "prefill of prompt + video" in text and "after the decode" in text
