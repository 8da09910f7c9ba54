"""The OpenAI chat-completions wire format: requests in, responses and errors out.

Nothing here touches the model or the network. ``parse_chat_request`` turns a decoded JSON body into
a ``ChatRequest`` (video URL, question or conversation, ``RunOptions``) or raises ``ApiError`` with the
status and OpenAI-style body the client gets; ``error_from_exception`` maps the library's errors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from dycoke.config import RunOptions, request_fields, run_options
from dycoke.errors import ConfigError, DyCokeError, OutOfMemoryError, VideoError

Question = str | list[tuple[str, str]]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """A request that gets an error response: HTTP ``status`` and ``{"error": {message, type, code}}``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, code, param)


def error_from_exception(exc: BaseException) -> ApiError:
    """The response for an exception raised while answering one request (never re-raised: the server
    goes on serving)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), "invalid_option")
    if isinstance(exc, VideoError):
        return ApiError(400, str(exc), "invalid_video")
    if isinstance(exc, OutOfMemoryError):
        return ApiError(503, f"{exc} (this request only: the server goes on)", "out_of_memory")
    if isinstance(exc, DyCokeError):
        return ApiError(400, str(exc), "invalid_request")
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    name = type(exc).__name__
    return ApiError(500, f"internal error while answering: {name}{': ' + detail if detail else ''}", "internal_error")


# -- requests ---------------------------------------------------------------------------------------

# Extra top-level fields (the OpenAI client's ``extra_body``): our options, by the name ``run_options``
# knows, with the JSON type each takes. ``?``: null allowed (the option's "unset").
EXTRA_FIELDS: dict[str, str] = request_fields()  # every run option, by its field name and JSON kind
# Extra fields whose name differs from the option's: similarity ("fp32" | "model", as ``--similarity``)
# and prompt_style ("paper" | "checkpoint", as ``--prompt``).
_RENAMED_EXTRAS = ("similarity", "prompt_style")

# OpenAI's own fields: used, or accepted when they ask for nothing this server would do differently.
_USED = {
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stream",
    "stream_options",
}
_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
# Accepted only at their neutral value (what sending nothing means).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "stop": (None, [], ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "prompt_cache_retention": (None,),
}


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat-completions request.

    ``question`` is the last user message's text, or, for a multi-turn conversation, every turn as
    ``(role, text)`` ending with the user's; the video goes with the first user turn.
    """

    video_url: str
    question: Question
    options: RunOptions
    stream: bool
    include_usage: bool
    model: str | None


def parse_chat_request(body: Any, defaults: RunOptions) -> ChatRequest:
    """Validate a decoded JSON body; raise ``ApiError`` (400) naming the first problem."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", "invalid_json")
    unknown = sorted(k for k in body if k not in _known_fields())
    if unknown:
        raise bad_request(
            f"unknown field '{unknown[0]}'; besides OpenAI's fields this server takes: "
            f"{', '.join(sorted([*EXTRA_FIELDS, *_RENAMED_EXTRAS]))}",
            "unknown_field",
            unknown[0],
        )
    for name, neutral in _NEUTRAL.items():
        if name in body and not any(_same(body[name], v) for v in neutral):
            raise bad_request(f"'{name}' is not supported by this server (send it unset)", "unsupported_field", name)

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "invalid_type", "model")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad_request(f"n must be 1 (one answer per request), got {n!r}", "invalid_value", "n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "invalid_type", "stream")
    include_usage = False
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise bad_request("stream_options must be an object", "invalid_type", "stream_options")
        include_usage = bool(stream_options.get("include_usage", False))

    video_url, question, system = parse_messages(body.get("messages"))
    fields: dict[str, object] = {
        name: _typed(name, body[name], kind) for name, kind in EXTRA_FIELDS.items() if name in body
    }
    if "similarity" in body:
        if body["similarity"] not in ("fp32", "model"):
            raise bad_request(f"similarity must be 'fp32' or 'model', got {body['similarity']!r}", "invalid_value")
        fields["similarity_fp32"] = body["similarity"] == "fp32"
    if "prompt_style" in body:
        fields["style"] = _typed("prompt_style", body["prompt_style"], "str")
    if system is not None:
        fields["system_prompt"] = system
    fields.update(_generation_fields(body))
    try:
        options = run_options(defaults, **fields)
    except ConfigError as exc:
        raise bad_request(str(exc), "invalid_option") from exc
    return ChatRequest(
        video_url=video_url,
        question=question,
        options=options,
        stream=bool(stream),
        include_usage=include_usage,
        model=model,
    )


def parse_messages(messages: Any) -> tuple[str, Question, str | None]:
    """(video URL, question or conversation, system prompt or None) from OpenAI ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "invalid_messages", "messages")
    system: list[str] = []
    turns: list[tuple[str, list[str]]] = []  # consecutive messages of one role form one turn
    video: str | None = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", "invalid_messages", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            if turns:
                raise bad_request(f"{where}: a {role} message must come before the conversation", "invalid_messages")
            texts, videos = _content(message.get("content"), where, allow_video=False)
            system.extend(texts)
            continue
        if role not in ("user", "assistant"):
            raise bad_request(
                f"{where}: role must be system, developer, user or assistant, got {role!r}", "invalid_messages"
            )
        texts, videos = _content(message.get("content"), where, allow_video=role == "user")
        if videos:
            if video is not None:
                raise bad_request(
                    "only one video per conversation: send it once, in the first user message", "invalid_messages"
                )
            if turns and (turns[-1][0] != "user" or len(turns) > 1):
                raise bad_request(
                    f"{where}: the video must be in the first user message (later messages are text only)",
                    "invalid_messages",
                )
            video = videos[0]
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(texts)
        else:
            turns.append((role, list(texts)))
    if video is None:
        raise bad_request(
            'no video: put a content part {"type": "video_url", "video_url": {"url": ...}} in the first user message',
            "no_video",
            "messages",
        )
    if turns[0][0] != "user":
        raise bad_request("the conversation must start with a user message (it carries the video)", "invalid_messages")
    if turns[-1][0] != "user":
        raise bad_request("the last message must be the user's question", "no_question", "messages")
    conversation = [(role, "\n".join(t for t in texts if t.strip()).strip()) for role, texts in turns]
    if not conversation[-1][1]:
        raise bad_request("no question: the last user message has no text", "no_question", "messages")
    for number, (role, text) in enumerate(conversation[:-1], start=1):
        if not text:
            raise bad_request(f"turn {number} ({role}) has no text", "invalid_messages", "messages")
    question: Question = conversation[0][1] if len(conversation) == 1 else conversation
    return video, question, "\n".join(system) if system else None


def _content(content: Any, where: str, *, allow_video: bool) -> tuple[list[str], list[str]]:
    """(texts, video URLs) of a message's content: a string or a list of parts."""
    if content is None:
        return [], []
    if isinstance(content, str):
        _no_placeholder(content, where)
        return [content], []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", "invalid_messages")
    texts: list[str] = []
    videos: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}: a text part needs a string 'text'", "invalid_messages")
            _no_placeholder(text, where)
            texts.append(text)
        elif kind == "video_url":
            if not allow_video:
                raise bad_request(f"{where}: only a user message may carry the video", "invalid_messages")
            ref = part.get("video_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad_request(
                    f'{where}: a video_url part needs {{"url": "file://..." or "data:video/..."}}', "invalid_messages"
                )
            videos.append(url)
        elif kind in ("image_url", "input_audio", "file", "audio_url"):
            raise bad_request(
                f"{where}: '{kind}' parts are not supported; send one video_url part", "unsupported_content"
            )
        else:
            raise bad_request(f"{where}: unknown content part type {kind!r}", "invalid_messages")
    return texts, videos


def _no_placeholder(text: str, where: str) -> None:
    if "<video>" in text or "<image>" in text:
        raise bad_request(
            f"{where}: the text must not contain '<video>' or '<image>' (the server places the video)",
            "invalid_messages",
        )


def _generation_fields(body: dict[str, Any]) -> dict[str, object]:
    """OpenAI's sampling fields as ``GenerationOptions`` fields (temperature 0 or absent: greedy)."""
    fields: dict[str, object] = {}
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise bad_request(f"{name} must be a positive integer, got {value!r}", "invalid_value", name)
            fields["max_new_tokens"] = value
            break
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise bad_request(
            f"temperature must be a number in [0, 2], got {temperature!r}", "invalid_value", "temperature"
        )
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise bad_request(f"top_p must be a number in [0, 1], got {top_p!r}", "invalid_value", "top_p")
    fields["do_sample"] = bool(temperature)
    if temperature:
        fields["temperature"] = float(temperature)
        if top_p is not None:
            fields["top_p"] = float(top_p)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise bad_request(f"seed must be an integer, got {seed!r}", "invalid_value", "seed")
        fields["seed"] = seed
    return fields


def _typed(name: str, value: Any, kind: str) -> object:
    """``value`` checked against the JSON type of an extra field."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": _is_int(value),
        "float": _is_number(value),
    }[kind]
    if not ok:
        what = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number"}[kind]
        raise bad_request(f"{name} must be {what}{' or null' if optional else ''}, got {value!r}", "invalid_type", name)
    return float(value) if kind == "float" else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _same(value: Any, neutral: Any) -> bool:
    return type(value) is type(neutral) and value == neutral if neutral is not None else value is None


def _known_fields() -> set[str]:
    return {*_USED, *_IGNORED, *_NEUTRAL, *EXTRA_FIELDS, *_RENAMED_EXTRAS}


# -- responses --------------------------------------------------------------------------------------


def finish_reason(generated: int, max_new_tokens: int) -> str:
    return "length" if generated >= max_new_tokens else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    request_id: str, created: int, model: str, answer: str, reason: str, usage_: dict[str, int], report: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` object; ``report`` is our ``dycoke`` field."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "logprobs": None,
                "finish_reason": reason,
            }
        ],
        "usage": usage_,
        "dycoke": report,
    }


def chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    reason: str | None = None,
    *,
    with_usage_field: bool = False,
    usage_: dict[str, int] | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: ``delta`` None makes the usage-only chunk (no choices)."""
    out: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }
    if with_usage_field:
        out["usage"] = usage_
    if report is not None:
        out["dycoke"] = report
    return out


def now() -> int:
    return int(time.time())
