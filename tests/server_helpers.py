"""Helpers of ``tests/test_server.py``: a real server process on a loopback port, request builders,
and a fake ``VideoQA`` for unit tests of the engine (no model, deterministic, instant)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback address that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``dycoke serve`` in a child process, its output in ``log``."""

    def __init__(self, model: Path, log: Path, *args: str, api_key: str | None = None) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.log = log
        command = [
            sys.executable,
            "-m",
            "cli.app",
            "serve",
            "--model",
            str(model),
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]
        command += list(args)
        if api_key is not None:
            command += ["--api-key", api_key]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")  # a tiny model on a shared 2-core machine: no thread contention
        env.pop("DYCOKE_API_KEY", None)
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until ``/health`` answers (the model is loaded); fail with the log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become ready in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log_file.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.base}/health", timeout=10.0).json())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def user(url: str | None, text: str | None) -> dict[str, Any]:
    """A user message with an optional video part and optional text."""
    content: list[dict[str, Any]] = []
    if url is not None:
        content.append(video_part(url))
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def parse_sse(text: str) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of a server-sent-event body, and whether it ended with ``[DONE]``."""
    import json

    events: list[dict[str, Any]] = []
    done = False
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        assert not done, "an event after [DONE]"
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


# -- a fake VideoQA for engine unit tests ------------------------------------------------------------


@dataclass
class FakePrepared:
    path: str
    vision: Any = None
    prefixes: dict[Any, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return 1000


class FakeQA:
    """Answers ``answer: <question>`` word by word; records each batch; ``gate`` (when set) holds the
    worker inside ``answer_many`` until released; a question ``raise:<name>`` raises that error."""

    def __init__(self) -> None:
        self.loaded = SimpleNamespace(source="fake-model", num_layers=4, device=SimpleNamespace(type="cpu"))
        self.batches: list[list[Any]] = []
        self.prepared = 0
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.stopped_early = False

    def prepare(self, path: Any, options: Any = None, *, with_signals: bool = False) -> FakePrepared:
        self.prepared += 1
        return FakePrepared(str(path))

    def answer_many(
        self,
        prepared: Any,
        questions: list[Any],
        options: Any = None,
        *,
        batch_size: int = 1,
        share_prefix: bool = True,
        on_texts: list[Any] | None = None,
        stop: Any = None,
    ) -> list[Any]:
        from dycoke.errors import OutOfMemoryError, VideoError

        self.batches.append(list(questions))
        self.entered.set()
        for question in questions:
            if isinstance(question, str) and question.startswith("raise:"):
                kind = question.split(":", 1)[1]
                errors = {"oom": OutOfMemoryError("out of GPU memory in generation"), "video": VideoError("bad video")}
                raise errors.get(kind, RuntimeError("boom"))
        if self.gate is not None:
            deadline = time.monotonic() + 10
            while not self.gate.is_set() and time.monotonic() < deadline:
                if stop is not None and stop():
                    self.stopped_early = True
                    break
                time.sleep(0.01)
        reports = []
        for index, question in enumerate(questions):
            text = question if isinstance(question, str) else question[-1][1]
            answer = f"answer: {text}"
            if on_texts is not None and on_texts[index] is not None:
                for word in answer.split(" "):
                    on_texts[index](word + " ")
            reports.append(_fake_report(answer, len(answer.split())))
        return reports


def _fake_report(answer: str, generated: int) -> Any:
    from dycoke.report import Memory, Report, Timings, TokenCounts, VideoInfo

    return Report(
        answer=answer,
        method="dycoke",
        model="fake-model",
        random_weights=True,
        question="",
        video=VideoInfo("v", 1.0, 1, 1.0, (1, 1), (1, 1), [0], [0.0]),
        tokens=TokenCounts(1, 1, [1], 2, 2, 10, generated),
        timings_s=Timings(video_decode=0.5, preprocess=0.25, vision_encoder=0.25, ttft=2.0, total=3.0),
        memory=Memory("cpu", "float32", None, 0),
    )
