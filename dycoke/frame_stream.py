"""Reading a video in a forked child, into memory both processes map, frame by frame.

``FrameStream`` forks; the child runs ``decode_video`` with a sink whose array lives in a memfd (an
anonymous shared file: not limited by the size of ``/dev/shm``, 64 MB in a default Docker container)
and sends the parent, over a Unix socket, the file's descriptor, then the slot of every frame as it
lands (``notify``), then the video's metadata or its error. The parent maps the same memory, so no
frame is ever copied between the processes, and the parent can work on the frames that
have landed while the child decodes the rest: ``VideoQA.prepare`` encodes them on the GPU meanwhile
(with ``DYCOKE_STREAM_VIDEO=1``).

Measured (``benchmarks/try_forked_reading.py``), 128 frames of the 720p sample, the parent idle: on the
2-core machine 0.79 s into new memory, 0.57 s into memory kept from an earlier read (``_release``),
0.45 s for reader threads in the process and 4.0 s for the pickled hand-over this replaced; on the H200
machine 1.10, 0.85 and 0.77 s (a busy run; a bare fork of a process holding a CUDA context takes 7-23
ms). The command line reads this way while the model loads.

Why a process and not the reader threads: the readers need the interpreter lock between frames, and
a caller busy in Python beside them (launching the vision encoder's kernels) slowed a 128-frame decode
from 0.53-0.62 s to 1.02 s (``benchmarks/try_decode_contention.py``). The child has its own.

The child runs only the reading code (numpy, PyAV, decord; never CUDA) and leaves with ``os._exit``.
A fork of a process whose other threads hold a lock can deadlock on that lock: the reading path takes
none of the parent's locks, and CPython re-initialises its own (imports, the GIL, logging,
``concurrent.futures``) in the child.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import socket
import sys
import threading
import time
import warnings
import weakref
from array import array
from dataclasses import replace
from pathlib import Path
from types import TracebackType

import numpy as np

from dycoke.config import VideoOptions
from dycoke.errors import VideoError
from dycoke.reading import DecodedVideo, decode_video

_HEADER, _FRAMES, _DONE, _ERROR = b"A", b"F", b"D", b"E"
_MESSAGE_BYTES = 1 << 22  # a message's largest size: the metadata of a read of thousands of frames


def forked_reading_available() -> bool:
    """Whether this platform has what ``FrameStream`` needs (Linux: fork, memfd, descriptor passing)."""
    return (
        sys.platform == "linux" and hasattr(os, "fork") and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
    )


def fork_reader(video: str | Path, options: VideoOptions | None = None, *, notify: bool = True) -> FrameStream | None:
    """A ``FrameStream`` of the video, or None where no child can be had: a platform without what it
    needs (``forked_reading_available``), or a fork or memfd refused (process or memory limits). The
    caller then reads in its own process."""
    if not forked_reading_available():
        return None
    try:
        return FrameStream(video, options, notify=notify)
    except OSError:
        return None


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: map a range in, writable, in one call instead of page by page


class _Arena:
    """Shared memory that a read's frames lived in, kept for a later read (see ``_release``)."""

    def __init__(self, memory: mmap.mmap) -> None:
        self.memory = memory
        self.nbytes = len(memory)


_IDLE_LOCK = threading.Lock()
_IDLE: list[_Arena] = []  # at most one: the largest arena no frames live in any more


def _claim() -> _Arena | None:
    """Take the idle arena, if any, for one read."""
    with _IDLE_LOCK:
        return _IDLE.pop() if _IDLE else None


def _release(arena: _Arena) -> None:
    """An arena no frames live in any more: kept for the next read when it is the largest.

    Shared memory gets no transparent huge pages: its first use faults in 4 KiB pages one by one, 0.24
    s more than private memory for 128 frames of 720p (354 MB) on the H200 machine, the whole cost of
    the forked read over reader threads in the process (``benchmarks/try_forked_reading.py``). A read
    into memory already used costs none of it. So the process keeps the largest arena it has used
    (until a read needs a larger one): a server's reads then allocate nothing."""
    with _IDLE_LOCK:
        if not _IDLE or _IDLE[0].nbytes < arena.nbytes:
            _IDLE[:] = [arena]


def _new_memory(nbytes: int) -> tuple[int, mmap.mmap]:
    """A memfd of ``nbytes`` and its shared mapping (the caller closes the descriptor)."""
    fd = os.memfd_create("dycoke-frames", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return fd, mmap.mmap(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise


class _SharedSink:
    """The child's ``FrameSink``: frames into memory the parent maps (the arena the parent lent, when
    it is large enough, else a new memfd whose descriptor goes to the parent), slots reported as they
    land."""

    def __init__(self, sock: socket.socket, notify: bool, arena: _Arena | None) -> None:
        self.sock = sock
        self.notify = notify
        self.in_order = notify  # who hears of every frame works through them in order
        self.arena = arena
        self.lock = threading.Lock()  # the readers' threads report concurrently

    def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        nbytes = int(np.prod(shape))
        arena, self.arena = self.arena, None  # a read that restarts gets new memory
        if arena is not None and arena.nbytes >= nbytes:
            with contextlib.suppress(OSError, ValueError):  # older kernels: faulted in page by page
                arena.memory.madvise(_MADV_POPULATE_WRITE, 0, nbytes)
            with self.lock:
                self.sock.send(_HEADER + pickle.dumps((shape, True)))
            return np.frombuffer(arena.memory, dtype=np.uint8, count=nbytes).reshape(shape)
        fd, memory = _new_memory(max(nbytes, 1))
        try:
            with self.lock:
                socket.send_fds(self.sock, [_HEADER + pickle.dumps((shape, False))], [fd])
        finally:
            os.close(fd)
        return np.frombuffer(memory, dtype=np.uint8, count=nbytes).reshape(shape)

    def landed(self, slots: list[int]) -> None:
        if self.notify:
            with self.lock:
                self.sock.send(_FRAMES + array("i", slots).tobytes())


def _child(sock: socket.socket, video: str, options: VideoOptions | None, notify: bool, arena: _Arena | None) -> None:
    """The forked child's whole life: read, report, leave without running the parent's exit handlers."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
        try:
            decoded = decode_video(video, options, sink=_SharedSink(sock, notify, arena))
            decoded.frames = replace(decoded.frames, frames=np.empty((0,), dtype=np.uint8))  # the parent maps them
            sock.send(_DONE + pickle.dumps((decoded, time.perf_counter())))
        except BaseException as exc:  # every failure goes to the parent
            try:
                payload = pickle.dumps(exc)
            except Exception:
                payload = pickle.dumps(VideoError(f"cannot read video {video}: {type(exc).__name__}: {exc}"))
            sock.send(_ERROR + payload)
    finally:
        os._exit(0)


class FrameStream:
    """A video being read by a forked child into shared memory (see the module docstring).

    ``frames`` is the (F, H, W, 3) uint8 array once the child has sized it (``None`` before);
    ``landed()`` waits for frames and returns their slots; ``result()`` waits for the end and returns
    the ``DecodedVideo`` (its frames are ``frames``) or raises the read's error (``VideoError``,
    ``ConfigError``). Use it as a context manager, or call ``close()``: that ends a child still reading.
    ``decode_s`` runs from the fork to the child's last frame (its clock is the parent's).
    """

    def __init__(self, video: str | Path, options: VideoOptions | None = None, *, notify: bool = True) -> None:
        if not forked_reading_available():
            raise RuntimeError("reading in a forked child needs Linux (fork, memfd_create, descriptor passing)")
        self.video = str(video)
        self.frames: np.ndarray | None = None
        self.generation = 0  # allocations seen: a read that falls back to decoding forward sizes anew
        self._decoded: DecodedVideo | None = None
        self._error: BaseException | None = None
        self._lent = _claim()  # the child writes into it when it is large enough
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads running
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (coverage does not follow it)
            parent.close()
            _child(child, self.video, options, notify, self._lent)
        child.close()
        self.pid: int | None = pid
        self.sock = parent

    # -- the parent's side ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Whether the read has ended (with a result or an error)."""
        return self._decoded is not None or self._error is not None

    def landed(self) -> list[int] | None:
        """Wait for the next frames; their slots in ``frames`` (possibly none, when only the array was
        sized), or None once the read has ended (then ``result()`` returns or raises). A slot can land
        twice when the read restarts (``generation`` grows): the frame is the same."""
        if self.finished:
            return None
        return self._receive()

    def result(self) -> DecodedVideo:
        """Wait for the end of the read: the decoded video, or its error raised."""
        while not self.finished:
            self._receive()
        if self._error is not None:
            raise self._error
        assert self._decoded is not None
        return self._decoded

    def close(self) -> None:
        """End the child if it still runs, collect it, close the socket."""
        if self.pid is not None:
            if not self.finished:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = None
        self._give_back()  # only once no child can write into it
        self.sock.close()

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "pid", None) is not None:
            self.close()

    def _receive(self) -> list[int] | None:
        """One message: the slots it reports, [] for the array's size, None for the end."""
        message, fds, _, _ = socket.recv_fds(self.sock, _MESSAGE_BYTES, 1)
        kind, body = message[:1], message[1:]
        if kind == _FRAMES:
            return array("i", body).tolist()
        if kind == _HEADER:
            shape, reused = pickle.loads(body)
            nbytes = int(np.prod(shape))
            if reused and self._lent is not None:
                arena, self._lent = self._lent, None
            else:
                try:
                    arena = _Arena(mmap.mmap(fds[0], max(nbytes, 1)))
                finally:
                    for fd in fds:
                        os.close(fd)
                self._give_back()  # lent, too small
            self.frames = np.frombuffer(arena.memory, dtype=np.uint8, count=nbytes).reshape(shape)
            weakref.finalize(self.frames, _release, arena)  # once no view of these frames is left
            self.generation += 1
            return []
        if kind == _DONE:
            decoded, ended = pickle.loads(body)
            assert self.frames is not None
            decoded.frames = replace(decoded.frames, frames=self.frames)
            decoded.decode_s = ended - self.started
            self._decoded = decoded
        elif kind == _ERROR:
            self._error = pickle.loads(body)
        else:  # the socket closed without a result: the child died (a crash in a native decoder)
            status = self._reap()
            self._error = VideoError(f"cannot read video {self.video}: the decoding process ended ({status})")
            return None
        self._reap()
        return None

    def _give_back(self) -> None:
        """An arena lent to the child and not (or no longer) to be used: idle again."""
        if self._lent is not None:
            _release(self._lent)
            self._lent = None

    def _reap(self) -> str:
        if self.pid is None:
            return "already collected"
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"
