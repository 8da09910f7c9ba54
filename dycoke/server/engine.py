"""One model, one worker thread, a queue of requests answered in batches.

The GPU is never shared between threads: only the worker calls the model. Requests wait in a FIFO
queue; the worker takes the oldest and, with it, every waiting request on the same video (same file
identity) with the same run options apart from the question, up to ``max_batch_size``, and answers
them with one ``answer_many`` call (the video prepared once, the shared prefix prefilled once).

Each request has its own channel of events, an asyncio queue on the server's event loop that the
worker feeds with ``loop.call_soon_threadsafe``: the answer text as it grows (streaming requests
only), then the report or the error. A cancelled request (its client went away) is dropped if it is
still queued; if it runs, it stops receiving, and once every request of the running batch is
cancelled, generation stops at the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dycoke.config import RunOptions, needs_vision_signals
from dycoke.errors import DyCokeError, OutOfMemoryError
from dycoke.server.cache import PreparedCache
from dycoke.server.media import MediaStore, VideoSource
from dycoke.server.protocol import ApiError, Question

if TYPE_CHECKING:
    from dycoke.pipeline import PreparedVideo, VideoQA
    from dycoke.report import Report

log = logging.getLogger("dycoke.server")


@dataclass
class Text:
    """A new piece of the answer (streaming requests)."""

    piece: str


@dataclass
class Done:
    """The answer and its report; ``cache_hit``: the prepared video came from the cache."""

    report: Report
    cache_hit: bool


@dataclass
class Failed:
    """The request failed with ``error`` (already mapped to its response)."""

    error: BaseException


Event = Text | Done | Failed


class ShuttingDown(Exception):
    """The server stopped before the request was answered."""


@dataclass(eq=False)
class Job:
    """One request in the engine: what to answer, and where its events go."""

    source: VideoSource
    question: Question
    options: RunOptions
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent_text: bool = False  # some answer text reached the client (no silent retry after that)
    finished: bool = False  # the last event was emitted

    @property
    def needs_signals(self) -> bool:
        return needs_vision_signals([self.options.method.method])

    @property
    def group_key(self) -> tuple[Any, ...]:
        """Requests with equal keys are answered in one batch."""
        return (self.source.identity, self.options, self.needs_signals)

    @property
    def batchable(self) -> bool:
        """A seeded sampled request runs alone, so that its seed gives the answer it gives alone."""
        gen = self.options.generation
        return not (gen.do_sample and gen.seed is not None)

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the request's handler (from any thread; dropped once its loop is closed)."""
        if isinstance(event, Done | Failed):
            self.finished = True
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class StripStream:
    """Pieces of a growing text, emitted so that they add up to the text's ``.strip()`` (the answer
    reports carry): leading whitespace is dropped, trailing whitespace held back until more text follows."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        core = text.rstrip()
        self._held = text[len(core) :]
        return core


class Engine:
    """Runs every request of the server on one ``VideoQA`` from one worker thread."""

    def __init__(
        self,
        qa: VideoQA,
        media: MediaStore,
        *,
        cache_bytes: int,
        max_batch_size: int,
        max_queue: int,
        batch_wait_s: float = 0.02,
    ) -> None:
        self.qa = qa
        self.batch_wait_s = batch_wait_s
        self._busy_arrivals = 0  # requests that arrived while a batch ran: clients are asking concurrently
        self._last_group_size = 0  # clients answered together send their next questions together
        self.media = media
        self.cache = PreparedCache(cache_bytes)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.num_layers = int(qa.loaded.num_layers)
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._accepting = True
        self._closing = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self.answered = 0
        self.failed = 0
        self.cancelled = 0
        self.batches = 0
        self.stopped_batches = 0  # batches whose generation stopped early: every client left, or shutdown
        self.largest_batch = 0

    @property
    def model_id(self) -> str:
        return str(self.qa.loaded.source)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="dycoke-engine", daemon=True)
                self._thread.start()

    def queue_size(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self._pending) + len(self._running)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            waiting, running = len(self._pending), len(self._running)
        return {
            "waiting": waiting,
            "running": running,
            "answered": self.answered,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "batches": self.batches,
            "stopped_batches": self.stopped_batches,
            "largest_batch": self.largest_batch,
            "cache": self.cache.stats(),
        }

    def submit(self, job: Job) -> None:
        """Queue ``job``; ApiError 503 when the server is stopping or the queue is full, 400 when its
        options cannot apply to this model. On error the caller still owns ``job.source``."""
        job.options.method.check_against_model(self.num_layers)  # ConfigError: the handler maps it to 400
        with self._cond:
            if not self._accepting:
                raise ApiError(503, "the server is shutting down", "shutting_down")
            if len(self._pending) + len(self._running) >= self.max_queue:
                raise ApiError(503, f"the server is busy ({self.max_queue} requests queued); retry later", "queue_full")
            self._pending.append(job)
            if self._running:
                self._busy_arrivals += 1
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client of ``job`` went away: drop it if queued, stop feeding it if it runs."""
        if job.cancelled.is_set() or job.finished:
            return
        job.cancelled.set()
        with self._cond:
            queued = job in self._pending
            if queued:
                self._pending.remove(job)
            self.cancelled += 1
        if queued:
            job.finished = True
            self.media.release(job.source)

    def stop_accepting(self) -> None:
        """New requests get 503 from now on; queued and running ones go on."""
        with self._cond:
            self._accepting = False

    def close(self, timeout: float = 2.0) -> None:
        """Stop: refuse new requests, fail the queued ones, stop the running batch at its next step,
        and wait up to ``timeout`` seconds for the worker."""
        with self._cond:
            self._accepting = False
            self._closing = True
            self._abort = True
            dropped = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in dropped:
            job.emit(Failed(ApiError(503, "the server shut down before answering", "shutting_down")))
            self.media.release(job.source)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._answer(group)
            except BaseException as exc:  # a bug here must not end the worker: every later request would hang
                log.exception("the engine failed on a batch")
                self._fail(group, exc)
            finally:
                with self._cond:
                    self._running = []
                for job in group:
                    self.media.release(job.source)

    def _next_group(self) -> list[Job] | None:
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            group = [first]
            if first.batchable:
                self._gather(group)
                # Clients asking concurrently send their next questions a few ms apart when a batch ends:
                # wait a moment for them, so that they form one batch instead of several small ones. How
                # many to wait for: a full batch when requests arrived while the last one ran, else as
                # many as the last batch answered (its clients ask again after their answers came).
                concurrent, self._busy_arrivals = self._busy_arrivals > 0, 0
                wanted = self.max_batch_size if concurrent else min(self._last_group_size, self.max_batch_size)
                deadline = time.monotonic() + self.batch_wait_s
                while len(group) < wanted and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    self._gather(group)
            self._last_group_size = len(group)
            self._running = group
            return group

    def _gather(self, group: list[Job]) -> None:
        """Move the waiting requests that can join ``group`` (same video and options) into it, up to the
        batch size. The caller holds the lock."""
        key = group[0].group_key
        for job in list(self._pending):
            if len(group) >= self.max_batch_size:
                return
            if job.batchable and job.group_key == key:
                group.append(job)
                self._pending.remove(job)

    def _answer(self, group: list[Job]) -> None:
        """Prepare the group's video (or take it from the cache), answer the group as one batch; if the
        batch fails, answer its requests one by one (one bad request never fails the others), except
        those that already received text."""
        try:
            prepared, hit = self._prepared(group[0])
        except Exception as exc:  # the same video and options for all: the same error for all
            self._fail(group, exc)
            return
        try:
            self._answer_batch(group, prepared, hit)
        except Exception as exc:
            if len(group) == 1 or self._abort:
                self._fail(group, exc)
                return
            self._after_error(exc)
            log.warning("a batch of %d failed (%s); answering its requests one by one", len(group), exc)
            for job in group:
                if job.finished or job.cancelled.is_set():
                    continue
                if job.sent_text:
                    self._fail([job], exc)
                    continue
                try:
                    self._answer_batch([job], prepared, hit)
                except Exception as single:
                    self._fail([job], single)

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        self._after_error(exc)
        for job in jobs:
            if not job.finished:
                self.failed += 1
                job.emit(Failed(exc))

    def _after_error(self, exc: BaseException) -> None:
        if isinstance(exc, OutOfMemoryError):
            log.warning("%s; dropping the %d cached videos to free memory", exc, len(self.cache))
            self.cache.clear()
        elif not isinstance(exc, ApiError | DyCokeError):
            log.error("request failed: %s: %s", type(exc).__name__, exc)

    def _answer_batch(self, group: list[Job], prepared: PreparedVideo, hit: bool) -> None:
        sinks: list[Callable[[str], None] | None] = [self._sink(job) if job.stream else None for job in group]
        stopped = False

        def stop() -> bool:
            nonlocal stopped
            stopped = stopped or self._abort or all(job.cancelled.is_set() for job in group)
            return stopped

        questions: list[Any] = [job.question for job in group]
        try:
            reports = self.qa.answer_many(
                prepared,
                questions,
                group[0].options,
                batch_size=len(group),
                share_prefix=True,
                on_texts=sinks if any(s is not None for s in sinks) else None,
                stop=stop,
            )
        finally:
            self.cache.refresh(prepared)
        self.batches += 1
        self.stopped_batches += int(stopped)
        self.largest_batch = max(self.largest_batch, len(group))
        for job, report in zip(group, reports, strict=True):
            report.video.path = job.source.display
            if hit:
                _discount_prepare(report)
            if not job.cancelled.is_set():
                self.answered += 1
            job.emit(Done(report, hit))

    def _prepared(self, job: Job) -> tuple[PreparedVideo, bool]:
        """The job's prepared video from the cache, or decoded and encoded now (and cached)."""
        video, signals = job.options.video, job.needs_signals
        cached = self.cache.get(job.source.identity, video, signals)
        if cached is not None:
            return cached, True
        prepared = self.qa.prepare(job.source.path, video, with_signals=signals)
        self.cache.put(job.source.identity, video, prepared)
        return prepared, False

    def _sink(self, job: Job) -> Callable[[str], None]:
        strip = StripStream()

        def on_text(piece: str) -> None:
            if job.cancelled.is_set():
                return
            text = strip.feed(piece)
            if text:
                job.sent_text = True
                job.emit(Text(text))

        return on_text


def _discount_prepare(report: Report) -> None:
    """A cached video was neither decoded, preprocessed nor encoded for this request: its report says
    so (those stages at 0, and out of ``ttft`` and ``total``)."""
    t = report.timings_s
    saved = t.video_decode + t.preprocess + t.vision_encoder
    t.video_decode = t.preprocess = t.vision_encoder = 0.0
    t.ttft = max(0.0, t.ttft - saved)
    t.total = max(0.0, t.total - saved)
