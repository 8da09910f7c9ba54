"""`dycoke serve` started by its command, asked by `dycoke ask --server` and `dycoke chat --server` as
real processes on a loopback port: same answers as in-process, the same report, no torch in the client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import HOST, ROOT, free_port
from tests.videos import textured_frames, write_video

OPTIONS = ["--frames", "6", "--max-new-tokens", "5", "--min-new-tokens", "5", "-L", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served")
    return write_video(folder / "clip.mp4", textured_frames(16, 96, 128, seed=21), fps=8)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    command = [sys.executable, "-m", "cli.app", "serve", "--model", str(tiny_checkpoint), "--device", "cpu"]
    command += ["--port", str(port), "--allowed-local-media-path", str(clip.parent), "--no-warmup"]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://{HOST}:{port}"
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, log.read_text()


def dycoke(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cli.app", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, input=stdin, timeout=120)


def test_ask_through_the_server_answers_as_in_process(server: str, clip: Path, tiny_checkpoint: Path) -> None:
    local = dycoke(
        "ask", str(clip), "What moves?", "--model", str(tiny_checkpoint), "--device", "cpu", "--json", *OPTIONS
    )
    assert local.returncode == 0, local.stderr
    remote = dycoke("ask", str(clip), "What moves?", "--server", server, "--json", *OPTIONS)
    assert remote.returncode == 0, remote.stderr
    here, there = json.loads(local.stdout), json.loads(remote.stdout)
    assert there["token_ids"] == here["token_ids"] and there["answer"] == here["answer"]
    assert there["tokens"] == here["tokens"] and there["method"] == "dycoke"
    streamed = dycoke("ask", str(clip), "What moves?", "--server", server, *OPTIONS)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip() == here["answer"] and "visual tokens to LLM" in streamed.stderr
    uploaded = dycoke("ask", str(clip), "What moves?", "--server", server, "--upload", "--json", *OPTIONS)
    assert uploaded.returncode == 0 and json.loads(uploaded.stdout)["token_ids"] == here["token_ids"]


def test_the_client_imports_no_torch_and_no_pydantic(server: str, clip: Path) -> None:
    """The thin client's start-up: no torch, and no pydantic (typer 0.29 builds a pydantic adapter per
    parameter, 70 ms of the client's 0.2 s; pyproject holds typer below it)."""
    code = (
        "import sys\nfrom cli.app import app\n"
        f"app(args=['ask', {str(clip)!r}, 'Why?', '--server', {server!r}, '-q', '--frames', '6', "
        "'--max-new-tokens', '3'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_server_errors_become_one_line(server: str, clip: Path, tmp_path: Path) -> None:
    outside = write_video(tmp_path / "elsewhere.mp4", textured_frames(8, 64, 64, seed=1), fps=8)
    done = dycoke("ask", str(outside), "What?", "--server", server, *OPTIONS)
    assert done.returncode == 1
    assert (
        done.stderr.strip().startswith("Error: the server answered 403:") and len(done.stderr.strip().splitlines()) == 1
    )
    done = dycoke("ask", str(clip), "What?", "--server", server, "--merge-ratio", "1.5")
    assert done.returncode == 2 and done.stderr.strip().startswith("Error: merge-ratio (K) must be in [0.0, 1.0)")


def test_chat_through_the_server(server: str, clip: Path) -> None:
    typed = "What moves?\nAnd then?\n/method full\nWhy?\n/quit\n"
    done = dycoke(
        "chat", str(clip), "--server", server, "--frames", "6", "--max-new-tokens", "4", "-L", "2", stdin=typed
    )
    assert done.returncode == 0, done.stderr
    answered = [line for line in done.stderr.splitlines() if "visual tokens ·" in line]
    assert len(answered) == 3 and "full" in answered[2]
