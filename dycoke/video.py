"""Which frames of a video the model sees, and reading them with decord.

Frame selection (pure functions, no decoding)
---------------------------------------------
Frame ``i`` of a video with ``n`` frames at ``source_fps`` has timestamp ``i / source_fps`` seconds and is
shown during ``[i / source_fps, (i + 1) / source_fps)``; the duration is ``n / source_fps``. The rate is
decord's ``get_avg_fps()`` (the stream's average frame rate, e.g. 30000/1001 = 29.97002997 for NTSC), so
timestamps are exact for constant-frame-rate video. Variable-frame-rate files break this (OpenCV's
``tree.avi``: 68 frames spread over 29.6 s, average rate reported as 15 fps, so a duration of 4.5 s);
``read_video`` warns when the packets' own timestamps end more than 10% away from ``n / source_fps``.

- ``frame_window``: ``start_s``/``end_s`` select the frames shown at any time in ``[start_s, end_s)``:
  first = floor(start_s * fps), last = ceil(end_s * fps) - 1 (products within 1e-6 of an integer are
  snapped to it, so 0.7 s at 10 fps is frame 7, not 6). ``end_s`` past the end is clipped to the last
  frame (``read_video`` adds a warning); ``start_s`` must be before the end of the video.
- ``uniform_indices`` (default): the paper's evaluation rule,
  ``numpy.linspace(first, last, num_frames, dtype=int)`` (truncation toward zero), over the whole video
  (``first=0, last=n-1``) or the window. When the window has fewer frames than requested, every frame
  of it is returned (``read_video`` adds a warning) - the model then sees fewer frames, never repeats.
- ``fps_indices``: one sample every ``1 / fps`` seconds from the window start, sample ``t`` taking the
  frame shown at ``t`` (floor(t * source_fps)); a source frame is never taken twice (asking for more
  than the source rate gives every frame). If that makes more than ``max_frames`` frames, it falls back
  to ``max_frames`` frames spread uniformly over the window (``uniform_indices``), so long videos keep
  full coverage at a lower rate instead of being cut short.

Reading (``read_video``)
------------------------
Only the selected frames are decoded: decord's ``VideoReader.get_batch`` seeks to the key frame before
each index and decodes forward from there, so a few frames of a long video cost a few GOPs, not the
whole file. With ``DYCOKE_DECODE_WORKERS=N`` (opt-in, see ``decode_workers``), frames spanning several
key-frame segments are dealt out to N readers on as many threads (decord decodes without holding the
GIL), each decoding its run of segments in order; the frames are identical to one reader's.

Seeking accuracy. decord locates key frames by their position in *decoding* order but uses that
position as a *display* index. For closed-GOP streams (x264's default, most H.264/H.265 MP4s) the two
agree and ``get_batch`` returns exactly the requested frames (checked on synthetic videos whose frames
encode their own index). For open-GOP streams (MPEG-4 Part 2 with B-frames, i.e. Xvid/DivX AVIs, some
broadcast H.264) a seek lands a few frames off (measured: +1 or +2 frames with 1 or 2 B-frames; on
OpenCV's ``box.mp4`` frame i-2 comes back for i past the second key frame). ``read_video`` therefore
checks seeking on the first two key frames after frame 0 (a few frames after each, decoded both by
seeking and sequentially, compared bit for bit); if they differ it decodes the selected frames
sequentially from the start instead (correct, slower; a warning says so). The check costs one
sequential decode up to the second key frame, against ``get_batch``'s own cost of about half a GOP
per selected frame. Files whose first GOPs seek correctly but later ones do not are not detected.

Reduced-size decoding. The model resizes every frame to 384x384 (bicubic, antialias). A 4K or 8K
source is not held at full size: when the shorter side exceeds ``min_decode_side`` the frames are
decoded already downscaled by decord's FFmpeg scale filter to a shorter side of ``min_decode_side``
(rounded up to even), the longer side keeping the aspect ratio (rounded to even); never upscaled.
32 frames of 4K at full size are 796 MB, at the default 768 they are 101 MB (1366x768).
The FFmpeg decoder still decodes full frames internally; only one extra full-size RGB frame (the
first one, decoded to learn the source size, which decord does not report otherwise) is held briefly.

Measured pixel effect (decord 0.6.0, torch 2.13 CPU): frames decoded reduced then resized to 384x384
(``interpolate(mode="bicubic", antialias=True)``, rounded) versus decoded full size then resized the
same way, absolute difference in 0..255 units over all pixels and channels:

=====================================  ===============  ===============  ===============
source (x264 CRF 12)                   shorter side 384 shorter side 576 shorter side 768
=====================================  ===============  ===============  ===============
synthetic texture 1920x1080            max 51, mean 4.3 max 26, mean 2.5 max 17, mean 1.6
synthetic texture 2560x1440            max 52, mean 4.5 max 26, mean 2.7 max 16, mean 1.6
synthetic texture 3840x2160            max 58, mean 5.0 max 27, mean 2.9 max 18, mean 1.8
Big Buck Bunny 1280x720 (real)         max 43, mean 1.2 max 20, mean 0.9 (not reduced)
Big Buck Bunny upscaled to 2560x1440   max 40, mean 1.2 max 18, mean 0.9 max 11, mean 0.8
=====================================  ===============  ===============  ===============

The synthetic texture (pixel-level noise, one-pixel stripes) is a worst case: its x264 encoding error
alone, measured the same way, is max 24 / mean 2.5. About 0.7 of the mean on natural content is a
constant colour shift of FFmpeg's scaling path (R and B about 1 level lower than the unscaled
conversion), present even for a 1440 -> 1080 reduction (mean 0.7). Hence the default
``DEFAULT_MIN_DECODE_SIDE = 768`` (twice the model input): mean under 1 level on natural content,
p99 2 levels. ``min_decode_side=None`` decodes at full size.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dycoke.errors import ConfigError, VideoError

DEFAULT_MIN_DECODE_SIDE = 768
"""Frames whose shorter side is larger are decoded downscaled to this shorter side (see module doc)."""

_SNAP = 1e-6  # products within this of an integer count as that integer (float error in s * fps)
_SEEK_CHECK_OFFSETS = (0, 1, 2, 3, 5, 8)  # frames after a key frame compared by seek vs sequential


@dataclass(frozen=True)
class VideoFrames:
    """Frames sampled from a video, with where they came from.

    Attributes:
        frames: (F, H, W, 3) uint8 RGB, H x W = ``decoded_size``.
        indices: F source frame indices (0-based, ascending).
        timestamps_s: F timestamps, ``index / source_fps`` seconds.
        source_fps: the stream's average frame rate.
        source_num_frames: frames in the whole video.
        duration_s: ``source_num_frames / source_fps``.
        source_size: (height, width) of the video.
        decoded_size: (height, width) of ``frames`` (smaller than ``source_size`` for big videos).
        warnings: one-line notes on what differs from the request (fewer frames, clipped window, ...).
    """

    frames: np.ndarray
    indices: list[int]
    timestamps_s: list[float]
    source_fps: float
    source_num_frames: int
    duration_s: float
    source_size: tuple[int, int]
    decoded_size: tuple[int, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """F, the number of frames sampled."""
        return len(self.indices)


# -- frame selection (pure) ------------------------------------------------------------------------


def _snap(x: float) -> float:
    """``x`` rounded to the nearest integer when within ``_SNAP`` of it (undoes float error)."""
    r = round(x)
    return float(r) if abs(x - r) < _SNAP else x


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _check_rate(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def uniform_indices(num_source_frames: int, num_frames: int, first: int = 0, last: int | None = None) -> list[int]:
    """``num_frames`` indices spread uniformly over frames ``first..last`` (inclusive), the paper's rule.

    ``numpy.linspace(first, last, num_frames, dtype=int)``: evenly spaced positions truncated to
    integers; the first and last frames are always included. E.g. 100 frames, 32 requested:
    ``[0, 3, 6, 9, 12, 15, 19, ..., 95, 99]``. If the range has fewer than ``num_frames`` frames,
    every frame of it is returned (so the result can be shorter than requested, never repeats).

    Args:
        num_source_frames: frames in the video (n >= 1).
        num_frames: frames wanted (F >= 1).
        first, last: the range, ``0 <= first <= last < n``; ``last`` defaults to ``n - 1``.

    Returns:
        min(F, last - first + 1) ascending indices.
    """
    _check_count("num_source_frames", num_source_frames)
    _check_count("num_frames", num_frames)
    last = num_source_frames - 1 if last is None else last
    if not 0 <= first <= last < num_source_frames:
        raise ConfigError(f"frame range {first}..{last} is not within the video's frames 0..{num_source_frames - 1}")
    if last - first + 1 <= num_frames:
        return list(range(first, last + 1))
    return [int(i) for i in np.linspace(first, last, num_frames, dtype=int)]


def _check_window(start_s: float | None, end_s: float | None) -> None:
    """ConfigError unless ``0 <= start_s < end_s`` (either may be None), finite numbers."""
    start = 0.0 if start_s is None else start_s
    if (
        isinstance(start, bool)
        or not isinstance(start, (int, float, np.number))
        or not (math.isfinite(start) and start >= 0)
    ):
        raise ConfigError(f"start must be a number of seconds >= 0, got {start_s!r}")
    if end_s is not None and (
        isinstance(end_s, bool)
        or not isinstance(end_s, (int, float, np.number))
        or not (math.isfinite(end_s) and end_s > start)
    ):
        raise ConfigError(f"end must be a number of seconds greater than start ({start:g} s), got {end_s!r}")


def frame_window(
    num_source_frames: int, source_fps: float, start_s: float | None = None, end_s: float | None = None
) -> tuple[int, int]:
    """The first and last (inclusive) frames shown at any time in ``[start_s, end_s)``.

    ``start_s`` defaults to 0 and ``end_s`` to the end of the video; an ``end_s`` past the end is
    clipped to the last frame.

    Raises:
        ConfigError: ``start_s < 0``, ``end_s <= start_s``, or a value that is not a finite number.
        VideoError: ``start_s`` is at or after the end of the video.
    """
    _check_count("num_source_frames", num_source_frames)
    _check_rate("source_fps", source_fps)
    _check_window(start_s, end_s)
    duration = num_source_frames / source_fps
    start = 0.0 if start_s is None else float(start_s)
    if start >= duration:
        raise VideoError(f"start {start:g} s is not before the end of the video (duration {duration:.3f} s)")
    first = math.floor(_snap(start * source_fps))
    last = num_source_frames - 1 if end_s is None else math.ceil(_snap(end_s * source_fps)) - 1
    return first, max(first, min(last, num_source_frames - 1))


def fps_indices(
    num_source_frames: int,
    source_fps: float,
    fps: float,
    max_frames: int,
    start_s: float | None = None,
    end_s: float | None = None,
) -> list[int]:
    """Frames sampled at ``fps`` per second of video time within the window, at most ``max_frames``.

    Sample k is at ``t_k = start + k / fps`` for every ``t_k`` before the window end (the end of the
    video by default) and takes the frame shown at ``t_k``, ``floor(t_k * source_fps)``; repeated
    frames (``fps`` above the source rate) are dropped. If more than ``max_frames`` frames result, the
    result is instead ``uniform_indices(n, max_frames, first, last)`` over the window: full coverage
    at a lower rate, never a truncated prefix.

    Returns:
        Ascending, distinct source frame indices (at least one).
    """
    _check_rate("fps", fps)
    _check_count("max_frames", max_frames)
    indices, first, last = _fps_samples(num_source_frames, source_fps, fps, start_s, end_s)
    if len(indices) > max_frames:
        return uniform_indices(num_source_frames, max_frames, first, last)
    return indices


def _fps_samples(
    num_source_frames: int, source_fps: float, fps: float, start_s: float | None, end_s: float | None
) -> tuple[list[int], int, int]:
    """``fps_indices`` before the ``max_frames`` cap, with the window's first and last frames."""
    first, last = frame_window(num_source_frames, source_fps, start_s, end_s)
    duration = num_source_frames / source_fps
    t0 = 0.0 if start_s is None else float(start_s)
    t_end = duration if end_s is None else min(float(end_s), duration)
    count = max(1, math.ceil(_snap((t_end - t0) * fps)))
    positions = (t0 + np.arange(count) / fps) * source_fps
    rounded = np.round(positions)
    positions = np.where(np.abs(positions - rounded) < _SNAP, rounded, positions)
    picked = np.clip(np.floor(positions).astype(np.int64), first, last)
    return [int(i) for i in np.unique(picked)], first, last


def decode_size(height: int, width: int, min_decode_side: int | None) -> tuple[int, int]:
    """(height, width) to decode a ``height`` x ``width`` video at (see "Reduced-size decoding").

    Unchanged when ``min_decode_side`` is None or the shorter side is already at most that; else the
    shorter side becomes ``min_decode_side`` rounded up to even and the longer side keeps the aspect
    ratio, rounded to even (never larger than the source).
    """
    short = min(height, width)
    if min_decode_side is None or short <= min_decode_side:
        return height, width
    target = min_decode_side + (min_decode_side % 2)
    if target >= short:
        return height, width
    scale = target / short

    def _even(v: float, cap: int) -> int:
        return min(cap, max(2, 2 * round(v / 2)))

    if height <= width:
        return target, _even(width * scale, width)
    return _even(height * scale, height), target


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


def _seek_check_positions(key_indices: Sequence[int], num_frames: int, max_index: int) -> list[int]:
    """Frames to compare (seek vs sequential): a few after each of the first two key frames > 0.

    Empty when every requested frame lies before the second key frame (no seek past a key frame).
    """
    later = [k for k in key_indices if k > 0][:2]
    if not later or max_index < later[0]:
        return []
    return sorted({min(k + d, num_frames - 1) for k in later for d in _SEEK_CHECK_OFFSETS})


def _read_forward(reader: Any, position: int, indices: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Decode ascending ``indices`` with ``next()`` only, from a reader that has never sought.

    ``position`` is the index of the frame the reader returns next (0 for a new reader). No seek and
    no ``skip_frames``: on the files where decord's seeking is wrong, its ``skip_frames`` and
    ``seek(0)`` are too (measured), while a new reader read forward returns every frame in order.

    Returns:
        (F, H, W, 3) uint8.
    """
    out = np.empty((len(indices), shape[0], shape[1], 3), np.uint8)
    for j, index in enumerate(indices):
        if index < position:  # a repeated index
            out[j] = out[j - 1]
            continue
        while position < index:
            reader.next()
            position += 1
        out[j] = reader.next().asnumpy()
        position += 1
    return out


def _first_seek_error(reader: Any, position: int, positions: Sequence[int], shape: tuple[int, int]) -> int | None:
    """Check decord's seeking on ``reader`` (which must not have sought yet) at ``positions``.

    Reads the frames at ``positions`` forward, then again by seeking, one at a time in descending
    order (so that each one really seeks). Returns the first position whose two decodings differ,
    or None when all are identical.
    """
    forward = _read_forward(reader, position, positions, shape)
    for j in reversed(range(len(positions))):
        sought = reader.get_batch([positions[j]]).asnumpy()[0]
        if not np.array_equal(sought, forward[j]):
            return positions[j]
    return None


def decode_workers() -> int:
    """Readers decoding at once: ``DYCOKE_DECODE_WORKERS`` (default 1). Opt-in: FFmpeg already decodes
    with several threads per reader, and on 2 cores extra readers gained nothing measurable (32 frames
    of a 600-frame 360p clip with a key frame every 30 frames: 2.5-2.7 s with one reader, 2.3-2.6 s with
    two); machines with many cores and long clips are where it may pay."""
    configured = os.environ.get("DYCOKE_DECODE_WORKERS", "1")
    return int(configured) if configured.isdigit() and int(configured) > 0 else 1


def keyframe_chunks(indices: Sequence[int], key_indices: Sequence[int], workers: int) -> list[list[int]]:
    """Split ascending frame ``indices`` into at most ``workers`` runs of whole key-frame segments.

    A reader that jumps to frame i decodes from the key frame before i; frames of one segment are best
    decoded by one reader in order. Segments are dealt out as contiguous runs balanced by the frames
    each reader must decode (from its segment's key frame to its last sampled frame). One run (no
    parallelism) when the sampled frames share a single segment.
    """
    if workers <= 1 or not indices:
        return [list(indices)]
    keys = sorted(set(key_indices) | {0})
    segments: list[list[int]] = []
    segment_costs: list[int] = []
    current = -1
    for index in indices:
        segment = bisect.bisect_right(keys, index) - 1
        if segment != current:
            segments.append([])
            segment_costs.append(0)
            current = segment
        segments[-1].append(index)
        segment_costs[-1] = index - keys[segment] + 1
    if len(segments) < 2:
        return [list(indices)]
    workers = min(workers, len(segments))
    target = sum(segment_costs) / workers
    chunks: list[list[int]] = [[]]
    load = 0
    for run, cost in zip(segments, segment_costs, strict=True):
        if chunks[-1] and load + cost / 2 > target and len(chunks) < workers:
            chunks.append([])
            load = 0
        chunks[-1].extend(run)
        load += cost
    return chunks


def _read_parallel(open_reader: Any, reader: Any, chunks: list[list[int]]) -> np.ndarray:
    """Decode each chunk with its own reader on its own thread (decord releases the GIL while it
    decodes); the first chunk uses ``reader``. Frames come back in the order of the chunks."""
    if len(chunks) == 1:
        return np.asarray(reader.get_batch(chunks[0]).asnumpy())

    def decode(job: tuple[int, list[int]]) -> np.ndarray:
        number, chunk = job
        own = reader if number == 0 else open_reader()
        return np.asarray(own.get_batch(chunk).asnumpy())

    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="dycoke-video") as pool:
        parts = list(pool.map(decode, enumerate(chunks)))
    return np.concatenate(parts)


def _import_decord() -> Any:
    try:
        import decord
    except ImportError as exc:  # pragma: no cover - decord is a dependency
        raise VideoError(f"reading videos needs the decord package ({exc})") from None
    # FFmpeg's decoder chatter ("A non-intra slice in an IDR NAL unit", ...) would interleave with the
    # answer on the terminal; real failures still surface as exceptions, turned into VideoError here.
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def read_video(
    path: str | Path,
    *,
    num_frames: int = 32,
    fps: float | None = None,
    max_frames: int = 64,
    start_s: float | None = None,
    end_s: float | None = None,
    min_decode_side: int | None = DEFAULT_MIN_DECODE_SIDE,
) -> VideoFrames:
    """Decode the sampled frames of a video (see the module docstring for which frames and sizes).

    Args:
        path: any file FFmpeg reads (mp4, mkv, avi, webm, ...).
        num_frames: frames spread uniformly over the video or window (used when ``fps`` is None).
        fps: sample this many frames per second of video instead, at most ``max_frames``.
        max_frames: cap for ``fps`` sampling.
        start_s, end_s: time window in seconds (default: the whole video).
        min_decode_side: decode big videos downscaled to this shorter side; None for full size.

    Returns:
        VideoFrames with ``frames`` of shape (F, H, W, 3), uint8 RGB.

    Raises:
        ConfigError: an option out of range (``num_frames``/``max_frames`` < 1, ``fps`` <= 0, ...).
        VideoError: missing path, a directory, not a video, damaged, no frames, ``start_s`` past the end.
    """
    _check_count("num_frames", num_frames)
    _check_count("max_frames", max_frames)
    if fps is not None:
        _check_rate("fps", fps)
    if min_decode_side is not None:
        _check_count("min_decode_side", min_decode_side)
    _check_window(start_s, end_s)
    name = str(path)
    file = Path(path)
    if not file.exists():
        raise VideoError(f"video not found: {name}")
    if file.is_dir():
        raise VideoError(f"video path is a directory, not a file: {name}")
    decord = _import_decord()

    warnings: list[str] = []
    with _decord_errors(name, warnings):
        probe = decord.VideoReader(name)
        total = len(probe)
        source_fps = _frame_rate(probe, total, name)
        last_end = float(probe.get_frame_timestamp([total - 1])[0][1])  # from the packets' timestamps
        try:
            first_frame = probe.next().asnumpy()  # decord does not report the size without decoding
        except StopIteration:
            raise VideoError(f"cannot read video {name}: no frame could be decoded (not a video file?)") from None
    source_size = (int(first_frame.shape[0]), int(first_frame.shape[1]))
    del first_frame
    duration = total / source_fps

    if math.isfinite(last_end) and last_end > 0 and abs(last_end - duration) > max(0.1 * duration, 2 / source_fps):
        warnings.append(
            f"variable frame rate: the frames' own timestamps end at {last_end:.3f} s, not at "
            f"{duration:.3f} s ({total} frames at {source_fps:.3f} fps); times here assume a constant rate"
        )
    first, last = frame_window(total, source_fps, start_s, end_s)
    if end_s is not None and end_s > duration + _SNAP:
        warnings.append(f"end {end_s:g} s is past the end of the video ({duration:.3f} s): using up to the end")
    if fps is not None:
        indices, _, _ = _fps_samples(total, source_fps, fps, start_s, end_s)
        if len(indices) > max_frames:
            where = "video" if (first, last) == (0, total - 1) else "window"
            warnings.append(
                f"{fps:g} fps gives {len(indices)} frames, more than max_frames={max_frames}: "
                f"using {max_frames} frames spread over the {where}"
            )
            indices = uniform_indices(total, max_frames, first, last)
    else:
        indices = uniform_indices(total, num_frames, first, last)
        if len(indices) < num_frames:
            where = "video" if (first, last) == (0, total - 1) else "window"
            warnings.append(
                f"{where} has {len(indices)} frames, fewer than the {num_frames} requested: using all {len(indices)}"
            )

    decoded_size = decode_size(*source_size, min_decode_side)

    def _open() -> Any:
        if decoded_size == source_size:
            return decord.VideoReader(name)
        return decord.VideoReader(name, width=decoded_size[1], height=decoded_size[0])

    with _decord_errors(name, warnings, capture_native=False):
        if decoded_size == source_size:
            reader, position = probe, 1  # the probe has read frame 0 and has not sought
        else:
            del probe
            reader, position = _open(), 0
        checks = _seek_check_positions(reader.get_key_indices(), total, indices[-1])
        bad = _first_seek_error(reader, position, checks, decoded_size) if checks else None
        if bad is None:
            chunks = keyframe_chunks(indices, reader.get_key_indices(), decode_workers())
            frames = _read_parallel(_open, reader, chunks)
        else:
            warnings.append(
                f"decord does not seek in this video frame-accurately (frame {bad} differs): "
                f"decoded it forward from the start up to frame {indices[-1]}"
            )
            del reader
            frames = _read_forward(_open(), 0, indices, decoded_size)
    if frames.shape != (len(indices), decoded_size[0], decoded_size[1], 3):
        raise VideoError(f"cannot read video {name}: decoder returned frames of shape {frames.shape}")
    return VideoFrames(
        frames=frames,
        indices=list(indices),
        timestamps_s=[i / source_fps for i in indices],
        source_fps=source_fps,
        source_num_frames=total,
        duration_s=duration,
        source_size=source_size,
        decoded_size=decoded_size,
        warnings=warnings,
    )
