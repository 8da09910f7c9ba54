"""The thin client of `dycoke serve`: one chat-completions request per question, the answer streamed.

Speaks HTTP through the standard library (no httpx: importing it costs ~100 ms) and imports the library's
torch-free modules only, so `dycoke ask --server URL` starts fast.
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dycoke.config import GenerationOptions, MethodOptions, RunOptions, VideoOptions, request_fields
from dycoke.errors import DyCokeError
from dycoke.prompt import Turn
from dycoke.report import Report


class ServerError(DyCokeError):
    """The server answered with an error, or could not be reached."""


def video_url(video: str, upload: bool) -> str:
    """``file://`` URL of the absolute path, or (``upload``) a ``data:`` URL carrying the bytes."""
    path = Path(video).expanduser().resolve()
    if not upload:
        return path.as_uri()
    kind = mimetypes.guess_type(path.name)[0] or "video/mp4"
    if not kind.startswith("video/"):
        kind = "video/mp4"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def request_body(video: str, turns: list[Turn], options: RunOptions, *, upload: bool, stream: bool) -> dict[str, Any]:
    """The chat-completions request for a conversation about ``video`` (the video in the first turn)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": options.prompt.system_prompt}]
    for index, (role, text) in enumerate(turns):
        if index == 0:
            parts = [
                {"type": "video_url", "video_url": {"url": video_url(video, upload)}},
                {"type": "text", "text": text},
            ]
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": text})
    gen = options.generation
    body: dict[str, Any] = {
        "messages": messages,
        "stream": stream,
        "max_tokens": gen.max_new_tokens,
        "temperature": gen.temperature if gen.do_sample else 0,
    }
    if gen.do_sample:
        body["top_p"] = gen.top_p
    if gen.seed is not None:
        body["seed"] = gen.seed
    given = {**asdict(options.video), **asdict(options.generation), **asdict(options.method)}
    default = {**asdict(VideoOptions()), **asdict(GenerationOptions()), **asdict(MethodOptions())}
    body.update({k: given[k] for k in request_fields() if given[k] != default[k]})  # the options that were set
    body["method"] = options.method.method
    if not options.method.similarity_fp32:
        body["similarity"] = "model"
    if options.prompt.style != "paper":
        body["prompt_style"] = options.prompt.style
    return body


@dataclass
class ServerClient:
    """Talks to one `dycoke serve` (base URL such as http://127.0.0.1:8765)."""

    url: str
    api_key: str | None = None
    timeout_s: float = 600.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[: -len("/v1")]
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def ask(
        self,
        video: str,
        turns: list[Turn],
        options: RunOptions,
        *,
        upload: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> Report:
        """Send the conversation; stream the answer to ``on_text``; return the server's full report."""
        body = request_body(video, turns, options, upload=upload, stream=on_text is not None)
        connection, prefix = self._connection()
        try:
            connection.connect()  # within the connect timeout of 5 s; then each read may take up to timeout_s
            if connection.sock is not None:
                connection.sock.settimeout(self.timeout_s)
            data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            headers = {"Content-Type": "application/json", **self.headers}
            connection.request("POST", f"{prefix}/v1/chat/completions", body=data, headers=headers)
            reply = connection.getresponse()
            if on_text is None or reply.status >= 400:
                return Report.from_dict(self._checked(reply)["dycoke"])
            report: dict[str, Any] | None = None
            lines = (raw.decode("utf-8", "replace").rstrip("\r\n") for raw in reply)  # each line as it arrives
            for chunk in _events(lines):
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        on_text(piece)
                if "dycoke" in chunk:
                    report = chunk["dycoke"]
            if report is None:
                raise ServerError("the server's stream ended without its report")
            return Report.from_dict(report)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"cannot reach the dycoke server at {self.url}: {exc}") from exc
        finally:
            connection.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        """An unopened connection to the server (connect timeout 5 s) and the URL's path prefix."""
        parts = urllib.parse.urlsplit(self.url)
        kinds = {"http": http.client.HTTPConnection, "https": http.client.HTTPSConnection}
        try:
            if parts.scheme not in kinds or not parts.hostname:
                raise ValueError("the URL must start with http:// or https:// and name a host")
            return kinds[parts.scheme](parts.hostname, parts.port, timeout=5.0), parts.path
        except ValueError as exc:  # also a port that is not a number in 0-65535
            raise ServerError(f"cannot reach the dycoke server at {self.url}: {exc}") from None

    @staticmethod
    def _checked(reply: http.client.HTTPResponse) -> dict[str, Any]:
        """The reply's JSON object; ``ServerError`` with the server's message when its status is an error."""
        text = reply.read().decode("utf-8", "replace")
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        if reply.status >= 400:
            message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
            raise ServerError(f"the server answered {reply.status}: {message or text[:200]}")
        return dict(data)


def _events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to ``data: [DONE]``."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict) and "error" in event:
            raise ServerError(f"the server failed mid-stream: {event['error'].get('message', event['error'])}")
        yield event
