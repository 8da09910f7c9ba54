"""The HTTP side: an OpenAI-compatible API (as vLLM serves it) in front of the engine, and ``serve``.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``, ``GET /health``.
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dycoke.config import needs_vision_signals, run_options
from dycoke.errors import DyCokeError
from dycoke.heap import freeze_after_start
from dycoke.server import protocol
from dycoke.server.engine import Done, Engine, Event, Failed, Job, Text
from dycoke.server.media import MediaStore, VideoSource
from dycoke.server.protocol import ApiError
from dycoke.server.settings import ServerSettings

if TYPE_CHECKING:
    from dycoke.config import RunOptions
    from dycoke.pipeline import VideoQA

log = logging.getLogger("dycoke.server")

_JSON_SLACK = 1 << 20  # bytes a request may carry besides its base64 video


class ServerError(DyCokeError):
    """The server cannot start (e.g. its address is taken)."""


class _ClientGone(Exception):
    """The client disconnected while its request waited."""


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The web application around ``engine`` (whose worker it starts and stops with the app)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.close, 2.0)

    app = FastAPI(title="dycoke", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    started = int(time.time())
    body_limit = settings.max_upload_bytes * 4 // 3 + _JSON_SLACK

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, str(exc.detail), code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(protocol.error_from_exception(exc))

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(
                401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'", "invalid_api_key"
            )

    def check_open() -> None:
        if not engine.accepting:
            raise ApiError(503, "the server is shutting down", "shutting_down")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if engine.accepting else "shutting_down"
        body = {"status": status, "model": engine.model_id, "queue": engine.queue_size(), "engine": engine.stats()}
        return JSONResponse(body, status_code=200 if engine.accepting else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request)
        check_open()
        card = {
            "id": engine.model_id,
            "object": "model",
            "created": started,
            "owned_by": "dycoke",
            "root": engine.model_id,
        }
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        check_open()
        raw = await _read_body(request, body_limit, engine.media)
        try:  # a large body (an upload) is parsed off the event loop
            body = json.loads(raw) if len(raw) < _JSON_SLACK else await asyncio.to_thread(json.loads, raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({exc})", "invalid_json") from None
        parsed = protocol.parse_chat_request(body, settings.defaults)
        if parsed.model is not None and parsed.model != engine.model_id:
            raise ApiError(
                404,
                f"the model '{parsed.model}' does not exist; this server serves '{engine.model_id}'",
                "model_not_found",
            )
        source = await asyncio.to_thread(engine.media.open, parsed.video_url)
        job = Job(
            source=source,
            question=parsed.question,
            options=parsed.options,
            stream=parsed.stream,
            loop=asyncio.get_running_loop(),
        )
        try:
            engine.submit(job)
        except Exception as exc:
            engine.media.release(source)
            raise protocol.error_from_exception(exc) from None
        try:
            first = await _next_event(job, request, engine)
        except _ClientGone:
            return Response(status_code=499)
        except BaseException:
            engine.cancel(job)
            raise
        if isinstance(first, Failed):
            return _error_response(_mapped(first.error, source))
        model = engine.model_id
        if not parsed.stream:
            assert isinstance(first, Done)  # a non-streaming job gets no text events
            return JSONResponse(_completion(job, first, model))
        return StreamingResponse(
            _sse(job, first, model, source, parsed.include_usage, engine),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return app


# -- request handling helpers -----------------------------------------------------------------------


async def _read_body(request: Request, limit: int, media: MediaStore) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond: the rest is read and dropped, up to a
    bound, so that the client sees the answer instead of a reset connection)."""
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            too_big = True
        if too_big:
            if size > 2 * limit + 16 * _JSON_SLACK:
                break
            continue
        chunks.append(piece)
    if too_big:
        raise media.too_large(max(size, int(declared) if declared.isdigit() else 0) * 3 // 4)
    return b"".join(chunks)


async def _next_event(job: Job, request: Request, engine: Engine) -> Event:
    """The job's next event; while waiting, a client that disconnects cancels the job."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if done:
                return getter.result()
            if await request.is_disconnected():
                engine.cancel(job)
                raise _ClientGone
    finally:
        if not getter.done():
            getter.cancel()


def _mapped(exc: BaseException, source: VideoSource) -> ApiError:
    """The response for a failed job; an upload's temporary path is not shown to the client."""
    error = protocol.error_from_exception(exc)
    if str(source.path) != source.display and str(source.path) in error.message:
        error = ApiError(error.status, error.message.replace(str(source.path), source.display), error.code, error.param)
    return error


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _report_dict(done: Done) -> dict[str, Any]:
    """The ``dycoke`` field: the report as ``dycoke ask --json`` prints it, and whether the prepared
    video came from the cache; a non-finite number (not JSON) becomes null."""
    data = _finite(done.report.to_dict())
    data["video_cache"] = "hit" if done.cache_hit else "miss"
    return dict(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _reason(job: Job, done: Done) -> str:
    return protocol.finish_reason(done.report.tokens.generated, job.options.generation.max_new_tokens)


def _usage(done: Done) -> dict[str, int]:
    return protocol.usage(done.report.tokens.prompt, done.report.tokens.generated)


def _completion(job: Job, done: Done, model: str) -> dict[str, Any]:
    return protocol.completion(
        job.id, job.created, model, done.report.answer, _reason(job, done), _usage(done), _report_dict(done)
    )


def _sse_data(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _sse(
    job: Job, first: Event, model: str, source: VideoSource, include_usage: bool, engine: Engine
) -> AsyncIterator[bytes]:
    """The server-sent events of a streaming answer: the role, the text pieces, the finish (with the
    ``dycoke`` report), the usage if asked, ``[DONE]``. A client that goes away cancels the job."""

    def chunk(delta: dict[str, Any] | None, reason: str | None = None, **extra: Any) -> bytes:
        return _sse_data(
            protocol.chunk(job.id, job.created, model, delta, reason, with_usage_field=include_usage, **extra)
        )

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            if isinstance(event, Text):
                yield chunk({"content": event.piece})
            elif isinstance(event, Done):
                yield chunk({}, _reason(job, event), report=_report_dict(event))
                if include_usage:
                    yield chunk(None, usage_=_usage(event))
                yield _sse_data("[DONE]")
                return
            else:
                yield _sse_data(_mapped(event.error, source).body())
                yield _sse_data("[DONE]")
                return
            event = await job.events.get()
    finally:
        if not job.finished:
            engine.cancel(job)


# -- serving ---------------------------------------------------------------------------------------


def build_engine(qa: VideoQA, settings: ServerSettings) -> Engine:
    """The engine for ``qa`` with the settings' limits (and a fresh upload folder)."""
    media = MediaStore(settings.allowed_local_media_paths, settings.max_upload_bytes)
    return Engine(
        qa,
        media,
        cache_bytes=settings.cache_bytes,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )


def serve(settings: ServerSettings, qa: VideoQA | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, then return normally.

    Binds the address first (a taken port fails before the model loads), loads the model unless
    ``qa`` is given (a local checkpoint's weights read ahead onto the GPU during the imports, as
    ``ask`` reads them), warms it up with one short answer on a synthetic clip (not on CPU), and runs
    uvicorn. On a signal: new requests get 503, running ones have ``settings.shutdown_timeout_s`` to
    finish before they are cancelled, and the function returns.

    Raises:
        ServerError: the address cannot be bound.
        DyCokeError: the model cannot load (``ModelLoadError``, ``DeviceError``, ...).
    """
    _setup_logging()
    sock = _bind(settings.host, settings.port)
    engine: Engine | None = None
    try:
        if qa is None:
            from dycoke.config import ModelOptions
            from dycoke.startup import import_while_reading_weights

            options = ModelOptions(model=settings.model, device=settings.device, dtype=settings.dtype)
            weights = import_while_reading_weights(options)  # as a fresh `dycoke ask` does
            from dycoke.pipeline import VideoQA

            log.info("loading %s", settings.model)
            qa = VideoQA.load(options, weights=weights)
        if settings.warmup and qa.loaded.device.type != "cpu":
            t0 = time.perf_counter()
            warm_up(qa, settings.defaults)
            log.info("warm-up answer in %.2f s", time.perf_counter() - t0)
        freeze_after_start()  # no request pays for a full collection over the start-up's objects
        engine = build_engine(qa, settings)
        app = create_app(engine, settings)
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            timeout_graceful_shutdown=int(max(1, round(settings.shutdown_timeout_s))),
            log_level="info",
            lifespan="on",
        )
        server = _Server(config, engine)
        where = f"http://{_url_host(settings.host)}:{settings.port}/v1"
        log.info("serving %s on %s (%s)", engine.model_id, where, qa.loaded.device)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if engine is not None:
            engine.close(2.0)
            engine.media.close()
    log.info("stopped")


WARM_UP_TOKENS = 8
"""Tokens of each warm-up answer, all forced (``min_new_tokens``): the graph capture, the readback and a
minimum-length request's end-token suppression all run."""


def warm_up(qa: VideoQA, defaults: RunOptions) -> None:
    """Short streamed answers on a synthetic clip, the way the engine answers, for the default method
    and for ``full`` (the baseline a client compares with): a first question (the shared prefix
    prefilled) and a follow-up (continuing from the cached prefix). Each path's first run in a process
    pays for kernel loading, cuBLAS/cuDNN plans and CUDA graph capture. The video readers' libraries
    are imported too: a client's first file would pay for that import otherwise.

    Measured on the H200 (7B): with only the default method warmed, 4 tokens and no minimum, a client's
    first ``full`` question took 1.51 s against 1.03 s for its second, and DyCoke's first question and
    follow-up 1.62 and 1.19 s against 1.00 and 0.64 s
    (``benchmarks/results/serve-h200-before-warmup-change.json``)."""
    from dycoke.video.native import _import_av, _import_decord
    from dycoke.warm_answer import synthetic_clip

    _import_decord()
    _import_av()
    video = defaults.video
    count = min(video.max_frames, 32) if video.fps is not None else video.num_frames
    decoded = synthetic_clip(count)
    for method in dict.fromkeys([defaults.method.method, "full"]):
        options = run_options(defaults, method=method, max_new_tokens=WARM_UP_TOKENS, min_new_tokens=WARM_UP_TOKENS)
        prepared = qa.prepare(decoded, video, with_signals=needs_vision_signals([method]))
        for question in ("Describe the video.", "What happens next?"):  # a miss, then a hit on the prefix
            qa.answer_many(prepared, [question], options, batch_size=1, share_prefix=True, on_texts=[lambda _: None])


class _Server(uvicorn.Server):
    """uvicorn's server that tells the engine to stop accepting as soon as a signal arrives, and
    returns after a signal instead of raising it again (``serve`` returns normally)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.stop_accepting()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket for ``host:port`` (uvicorn listens on it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
