"""`dycoke ask` on unreadable files: stderr holds our one `Error: ...` line and none of decord's native log.

decord's C++ code logs (``[19:07:26] .../video_reader.cc:83: ERROR opening: ...``) straight to file
descriptor 2, which CliRunner does not see; hence a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "bigbuckbunny.mp4"


def _write(kind: str, path: Path) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(SAMPLE.read_bytes()[:2048])
    else:
        path.write_text("hello, this is not a video\n" * 20)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text"])
def test_ask_on_unreadable_file_prints_only_our_error(tmp_path: Path, kind: str) -> None:
    video = tmp_path / "x.mp4"
    _write(kind, video)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # the video is read before the model loads: a missing model directory is never reached
    command = [sys.executable, "-m", "cli.app", "ask", str(video), "What?", "--model", str(tmp_path / "no-model")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot read video {video}: "), result.stderr
    assert result.stdout == ""
