"""decord and PyAV as this package uses them: imports, their errors as ``VideoError`` (with decord's
native log captured at file descriptor 2 while a file opens, never printed), the stream's frame rate."""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from dycoke.errors import VideoError

# -- decoding --------------------------------------------------------------------------------------

_DECORD_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")
# decord's C++ log line (dmlc logging), e.g. "[19:07:26] /github/workspace/src/video/video_reader.cc:83: ERROR ..."
_NATIVE_LOG = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+:\d+: ")
# other native text: FFmpeg's av_log lines (silenced, see _import_decord) and dmlc stack traces
_NATIVE_OTHER = re.compile(r"^(\[[\w,]+ @ 0x[0-9a-fA-F]+\] |Stack trace returned |\s*\[bt\] )")
_FD2_LOCK = threading.RLock()  # file descriptor 2 belongs to the whole process: one redirection at a time


def _reason(exc: BaseException) -> str:
    """A short one-line reason from a decord/FFmpeg exception (no source paths, no stack)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = _DECORD_PREFIX.sub("", text)
    text = re.sub(r"^Check failed: .*\(\S+ vs\. \S+\)\s*", "", text)
    return text[:160]


def _flush_stderr() -> None:
    """Flush Python's own stderr buffer, so that it lands on the file descriptor 2 of the moment."""
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
    except (OSError, ValueError):  # closed or broken stderr: nothing to flush
        pass


def _write_fd2(data: bytes) -> None:
    """Write ``data`` to file descriptor 2, all of it (``os.write`` may write part)."""
    while data:
        try:
            data = data[os.write(2, data) :]
        except OSError:  # stderr closed or broken: the text has nowhere to go
            return


def _split_native(captured: bytes, messages: list[str]) -> bytes:
    """Sort what was written to file descriptor 2: decord's log messages (prefix of time and source file
    stripped) are appended to ``messages``, FFmpeg lines and stack traces are dropped; returns the rest
    (text other threads wrote meanwhile, e.g. a spinner), byte for byte."""
    other: list[str] = []
    for line in captured.decode("utf-8", "surrogateescape").splitlines(keepends=True):
        found = _NATIVE_LOG.search(line)
        if found:  # possibly glued to the end of someone else's text that had no newline
            other.append(line[: found.start()])
            message = " ".join(line[found.end() :].split())
            if message:
                messages.append(message[:200])
        elif not _NATIVE_OTHER.match(line):
            other.append(line)
    return "".join(other).encode("utf-8", "surrogateescape")


@contextmanager
def _native_stderr(messages: list[str]) -> Iterator[None]:
    """Send what is written to file descriptor 2 during the block to a temporary file instead of stderr.

    decord's C++ code logs there directly (``sys.stderr`` redirection does not see it). When the block
    ends, normally or by an exception, file descriptor 2 is restored, decord's log messages are appended
    to ``messages`` (one clean line each) and never printed; anything else written meanwhile (other
    threads' output) is passed on to stderr then. Blocks of concurrent threads take turns.
    """
    with _FD2_LOCK:
        _flush_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to keep clean
            yield
            return
        try:
            with tempfile.TemporaryFile() as capture:
                os.dup2(capture.fileno(), 2)
                try:
                    yield
                finally:
                    _flush_stderr()
                    os.dup2(saved, 2)
                    capture.seek(0)
                    _write_fd2(_split_native(capture.read(), messages))
        finally:
            os.close(saved)


def _opening_error(messages: Sequence[str], path: str) -> str | None:
    """FFmpeg's reason from decord's "ERROR opening: <path>, <reason>" log message, if one was captured."""
    for message in messages:
        if message.startswith("ERROR opening"):
            reason = message.removeprefix("ERROR opening").lstrip(": ")
            reason = reason.removeprefix(path).lstrip(", ") if reason.startswith(path) else reason.rpartition(", ")[2]
            return reason.strip()[:160] or None
    return None


def _last(messages: Sequence[str]) -> str:
    """The last captured log message, shortened to a reason ("" when none)."""
    return messages[-1][:160] if messages else ""


@contextmanager
def _decord_errors(path: str, warnings: list[str] | None = None, *, capture_native: bool = True) -> Iterator[None]:
    """Run decord calls with their native log captured (see ``_native_stderr``), never printed.

    ``capture_native=False`` leaves file descriptor 2 alone (long decodes: other threads' progress
    output must not wait); opening a file, where a bad one makes decord log, is always captured.

    Translates what decord raises (DECORDError, RuntimeError, AssertionError, ...) into VideoError, with
    FFmpeg's reason from the captured log where it says more than the exception. When the block succeeds,
    decord's log messages become one-line entries of ``warnings`` (dropped when it is None).
    """
    native: list[str] = []
    try:
        with _native_stderr(native) if capture_native else nullcontext():
            yield
    except (VideoError, MemoryError):
        raise
    except StopIteration:
        raise VideoError(f"cannot read video {path}: the decoder stopped early (truncated or damaged file)") from None
    except AssertionError as exc:
        if "frame count" in str(exc):
            raise VideoError(f"video has no frames: {path}") from None
        raise VideoError(f"cannot read video {path}: {_reason(exc) or _last(native) or 'decoder error'}") from None
    except Exception as exc:  # decord raises DECORDError (an Exception), RuntimeError, IndexError
        reason = _reason(exc)
        if "cannot find video stream" in reason:
            raise VideoError(f"cannot read video {path}: it has no video stream (or no frames)") from None
        if reason.startswith("Error reading"):  # decord's Python side; its C++ side logged FFmpeg's reason
            opening = _opening_error(native, path)
            if opening is None or opening.startswith("Invalid data found"):
                reason = "not a video file, or damaged/truncated"
            else:  # e.g. "Permission denied": not a matter of the file's contents
                reason = opening
        elif "buffer source" in reason:  # decord's filter graph got no pixel format: no frame to decode
            reason = "the video stream has no decodable frames"
        elif "av_read_frame failed" in reason:
            reason = "FFmpeg could not read its packets (truncated or damaged file)"
        reason = reason or _last(native) or "not a video file, or damaged"
        raise VideoError(f"cannot read video {path}: {reason}") from None
    if warnings is not None:
        warnings.extend(w for w in dict.fromkeys(f"decoder: {m}" for m in native) if w not in warnings)


def _frame_rate(reader: Any, num_frames: int, path: str) -> float:
    """The stream's average frame rate; from the last frame's end time when the container lacks it."""
    fps = float(reader.get_avg_fps())
    if math.isfinite(fps) and fps > 0:
        return fps
    end = float(reader.get_frame_timestamp([num_frames - 1])[0][1])
    if math.isfinite(end) and end > 0:
        return num_frames / end
    raise VideoError(f"cannot read video {path}: the frame rate is unknown (got {fps})")


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as exc:  # pragma: no cover - decord is a dependency
        raise VideoError(f"reading videos needs the decord package ({exc})") from None
    # FFmpeg's decoder chatter ("A non-intra slice in an IDR NAL unit", ...) would interleave with the
    # answer on the terminal; real failures still surface as exceptions, turned into VideoError here.
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency
        raise VideoError(f"reading videos needs the av (PyAV) package ({exc})") from None
    return av  # PyAV keeps FFmpeg's log off unless the application turns it on


@contextmanager
def _av_errors(path: str) -> Iterator[None]:
    """Turn PyAV's exceptions (FFmpeg errors, OSError) into a one-line VideoError."""
    try:
        yield
    except (VideoError, MemoryError, _SeekFailed):
        raise
    except Exception as exc:  # av.error.FFmpegError and its OSError-like subclasses, ValueError, ...
        text = str(exc).strip()
        reason = str(getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__))
        raise VideoError(f"cannot read video {path}: {reason[:160]}") from None


class _SeekFailed(Exception):
    """Seeking by timestamp did not give the frame asked for (missing, or frames out of order)."""
