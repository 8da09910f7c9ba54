"""Which frames of a video the model sees, and reading them exactly (decord, or PyAV where decord is wrong).

Frame selection (pure functions, no decoding)
---------------------------------------------
Frame ``i`` of a video with ``n`` frames at ``source_fps`` has timestamp ``i / source_fps`` seconds and is
shown during ``[i / source_fps, (i + 1) / source_fps)``; the duration is ``n / source_fps``. The rate is
decord's ``get_avg_fps()`` (the stream's average frame rate, e.g. 30000/1001 = 29.97002997 for NTSC), so
timestamps are exact for constant-frame-rate video. Variable-frame-rate files break this (OpenCV's
``tree.avi``: 68 frames spread over 29.6 s, average rate reported as 15 fps, so a duration of 4.5 s);
``read_video`` warns when the packets' own timestamps end more than 10% away from ``n / source_fps``.
Selection stays index-based for them, but the reported ``timestamps_s`` are the frames' own times (from
their pts) as soon as any frame is more than half a frame away from ``i / source_fps``.

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
The demux index. Before anything is decoded, one pass over the video stream's packets with PyAV
(``demux_index``: ``container.demux``, packets only, no decoding) gives every frame's presentation
timestamp in display order (the sorted pts), which frames are key frames and whether GOPs are open (a
packet that follows a key frame in decoding order but is shown before it: x265's default, x264's
``open-gop``, MPEG-4 Part 2 with B-frames). It is fast next to any decoding: 20-30 ms for a 60 s
1080p25 clip (1500 packets, 21 MiB), 57 ms for 180 s (64 MiB), 110 ms for a 268 MiB minute (reading
the file dominates). The frame count is the index's (packets neither empty nor cut by an edit list,
i.e. what the decoder outputs; decord counts cut packets too: 456 instead of 455 frames for OpenCV's ``box.mp4``).

Three decoders, chosen from the index (``VideoFrames.decoder`` says which):

- ``decord``, where its seeking is right: closed GOPs, and decord's frame count and key-frame indices
  equal the index's. decord locates key frames by their position in *decoding* order and uses it as a
  *display* index; the two agree for closed GOPs only (x264's default, most H.264/H.265 MP4s, VP9). For
  open GOPs a decord seek lands a few frames off (+1 or +2 frames with 1 or 2 B-frames, measured).
  ``get_batch`` seeks to the key frame before each frame and decodes forward.
- ``pyav``, seeking by timestamp, elsewhere (open GOPs, or decord's index disagrees): ``container.seek``
  to the key frame shown at or before the frame (by its pts, then its dts - MP4 and AVI demuxers seek
  by dts, Matroska by pts - then earlier key frames, then the start, until the demuxer lands at or
  before it), decode forward to the frame whose pts is the target's, convert it to RGB at the decode
  size. Sampled frames decoded from the same key frame (and the next one, when the decoder has already
  been fed its key frame) share one forward pass.
- ``sequential``, forward from the start, the i-th frame out of the decoder being frame i, where the
  timestamps cannot be trusted: missing or repeated, or a codec that reorders frames whose packets say
  they are in order (``box.mp4``: H.264 with B-frames in an MP4 without composition offsets; the first
  16 frames are decoded to tell such files); also the fallback, with a warning, when seeking by
  timestamp does not return a frame. Correct, but it decodes everything up to the last frame asked for.

So every frame returned is exactly the one at its display position (checked on synthetic clips whose
frames encode their own index: x264 closed and open GOP, x265, VP9, MPEG-4 in AVI, Matroska, variable
frame rate, portrait, reduced size; ``tests/test_video_exact.py``), and where seeking works the file is
never decoded as a whole: each frame costs the frames from its key frame to it.

Readers. The forward passes are dealt out, as contiguous runs of similar cost, to several readers on
threads, each with its own decord reader or PyAV container (both decode without holding the GIL):
``min(CPUs, passes needed, MAX_DECODE_WORKERS=8)`` by default, ``DYCOKE_DECODE_WORKERS=N`` overrides;
FFmpeg's own decoding threads per reader are the CPUs divided among the readers. The frames are the same
with any number of readers.

Seek modes. ``seek="exact"`` (default, the paper's evaluation) returns the sampled frames.
``seek="keyframe"`` returns for each sampled frame the key frame nearest to it in display order (within
the window; the earlier one on a tie), which costs a seek and one frame; where several sampled frames
have the same nearest key frame, the closest takes it and the others are decoded exactly, so no frame is
repeated (``keyframe_targets``). ``indices`` and ``timestamps_s`` are those of the frames returned,
``max_shift_s`` the largest time between a frame returned and the frame sampled. ``decode_cost`` gives,
from the index, the frames each mode decodes (``exact_frames_decoded``, ``keyframe_frames_decoded``:
for each forward pass the packets from its key frame to the last one needed) and the seeks, whatever
the mode used, so that a caller can tell how much cheaper keyframe mode would have been.

Measured on 2 CPUs shared with other jobs (so noisy: wall-clock median of 5 runs, 3 for 180 s, and the
fastest in brackets), 32 frames at full size (``min_decode_side=None``) of 1080p25 clips made with PyAV
(x264/x265 ``ultrafast``, CRF 23/28, smooth moving texture); "plain" is
``decord.VideoReader(p).get_batch(np.linspace(0, n - 1, 32).astype(int))``, "before" this module's
previous ``read_video`` (decode-and-compare seek check, then forward decoding for open GOPs):

=========================================  ===========  ============  ===========  ===========  ============
clip (decoder used)                        plain        before        exact        keyframe     frames dec.
=========================================  ===========  ============  ===========  ===========  ============
60 s H.264, key frame every 250 (decord)   3.58 (2.82)  6.82 (5.37)   3.73 (2.13)  2.47 (2.27)  1379 / 1283
60 s H.264, key frame every 50 (decord)    2.17 (2.01)  3.23 (2.85)   2.07 (1.82)  1.23 (0.93)   799 /  104
180 s H.264, key frame every 250 (decord)  7.00 (6.90)  9.24 (8.64)   5.64 (5.16)  3.53 (3.45)  3267 / 1828
60 s H.264 open GOP, 3 B-frames (pyav)     4.47 (3.19)  11.76 (9.35)  2.77 (2.13)  2.48 (2.17)  1389 / 1293
60 s HEVC, x265 defaults: open GOP (pyav)  6.26 (6.14)  26.7 (16.1)   4.87 (4.19)  4.81 (3.84)  1389 / 1293
=========================================  ===========  ============  ===========  ===========  ============

("frames dec.": ``decode_cost`` exact / keyframe.) With key frames every 250 frames and 32 samples most
samples share a key frame, so keyframe mode saves little; with one every 50 it decodes 8x fewer frames.
Plain decord happened to return the right frames of the open-GOP clips for these 32 indices (it is off
only for the few frames just before each key frame). On these clips the PyAV path, forced on the
closed-GOP ones, was faster than decord again (180 s exact: 4.50 s against 4.99 s, CPU 7.8 s against
9.2 s; every-50 keyframe: 0.84 s against 1.22 s): decord stays the decoder where it is right, since its
reduced-size frames are the reference (see below).

Reduced-size decoding. The model resizes every frame to 384x384 (bicubic, antialias). A 4K or 8K
source is not held at full size: when the shorter side exceeds ``min_decode_side`` the frames are
decoded already downscaled (decord: its FFmpeg scale filter; PyAV: ``to_ndarray(width=, height=,
interpolation="BICUBIC")``, i.e. swscale) to a shorter side of ``min_decode_side``
(rounded up to even), the longer side keeping the aspect ratio (rounded to even); never upscaled.
32 frames of 4K at full size are 796 MB, at the default 768 they are 101 MB (1366x768).
The FFmpeg decoder still decodes full frames internally; only one extra full-size RGB frame (the
first one, decoded by decord to learn the size it decodes at and that it can decode the file) is held
briefly.

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

The PyAV path's reduced frames are not decord's: its swscale conversion differs from decord's filter
graph (bilinear, area or other flags do not bring them closer). Measured (FFmpeg 7 via PyAV 18), same
metric as above, for the PyAV path against full size / PyAV against decord, both reduced:

=====================================  =====================  =====================  =====================
source (x264 CRF 12)                   shorter side 384       shorter side 576       shorter side 768
=====================================  =====================  =====================  =====================
synthetic texture 1920x1080            54 / 3.44 ; 27 / 3.11  36 / 2.18 ; 33 / 2.36  31 / 1.90 ; 33 / 2.11
synthetic texture 3840x2160            53 / 3.66 ; 24 / 3.27  25 / 1.94 ; 20 / 2.20  17 / 1.42 ; 18 / 1.72
Big Buck Bunny 1280x720 (real)         32 / 0.93 ; 29 / 0.92  21 / 0.84 ; 23 / 0.62  (not reduced)
Big Buck Bunny upscaled to 2560x1440   30 / 0.85 ; 19 / 0.85  12 / 0.73 ; 14 / 0.51   9 / 0.71 ; 15 / 0.36
=====================================  =====================  =====================  =====================

(max / mean in 0..255 levels after the 384x384 resize.) Against full size the PyAV path is as close as
decord's (natural content: mean 0.71 against decord's 0.74 at 768); the two reduced paths differ from
each other by a mean of 0.4 level on natural content (before the resize: 0.6, max 24). At full size
the two decoders' frames are identical (Big Buck Bunny, and every synthetic clip of the tests).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from dycoke.errors import ConfigError, VideoError

DEFAULT_MIN_DECODE_SIDE = 768
"""Frames whose shorter side is larger are decoded downscaled to this shorter side (see module doc)."""

SEEK_MODES = ("exact", "keyframe")
"""``read_video(seek=...)``: the sampled frames themselves, or the nearest key frames (see module doc)."""

MAX_DECODE_WORKERS = 8
"""Default cap on the readers decoding one video at once (``DYCOKE_DECODE_WORKERS`` overrides)."""

_SNAP = 1e-6  # products within this of an integer count as that integer (float error in s * fps)


@dataclass(frozen=True)
class VideoFrames:
    """Frames sampled from a video, with where they came from.

    Attributes:
        frames: (F, H, W, 3) uint8 RGB, H x W = ``decoded_size``.
        indices: F source frame indices (0-based display positions, ascending) of the frames returned
            (with ``seek="keyframe"``, the key frames taken instead of the sampled frames).
        timestamps_s: F timestamps of those frames, ``index / source_fps`` seconds; for a variable-rate
            file (a frame more than half a frame away from that) the frames' own presentation times.
        source_fps: the stream's average frame rate.
        source_num_frames: frames in the whole video.
        duration_s: ``source_num_frames / source_fps``.
        source_size: (height, width) of the video.
        decoded_size: (height, width) of ``frames`` (smaller than ``source_size`` for big videos).
        warnings: one-line notes on what differs from the request (fewer frames, clipped window, ...).
        seek: ``"exact"`` or ``"keyframe"``, the mode asked for.
        max_shift_s: largest |time of a frame returned - time of the frame sampled| (0.0 in exact mode).
        decode_cost: estimates from the demux index: ``exact_frames_decoded`` and ``keyframe_frames_decoded``
            (frames the decoder decodes in each mode: from each seek's key frame to the last frame it needs,
            or from the start when reading forward), ``exact_seeks`` and ``keyframe_seeks``; and ``readers``,
            the readers (threads) that decoded.
        decoder: ``"decord"`` (decord seeks right in this file), ``"pyav"`` (seek by timestamp) or
            ``"sequential"`` (forward from the start; the file's timestamps cannot be trusted).
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
    seek: str = "exact"
    max_shift_s: float = 0.0
    decode_cost: dict[str, int] = field(default_factory=dict)
    decoder: str = "decord"

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


# -- the demux index -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamIndex:
    """What one pass over a video stream's packets says, without decoding (see "The demux index").

    Attributes:
        stream: the stream's index in the container (FFmpeg's "best" video stream, the one decord reads).
        time_base: unit of ``pts``, in seconds.
        pts: (n,) int64 presentation timestamps in display order (ascending); frame i is ``pts[i]``.
        decode_position: (n,) int64, position in decoding order of display frame i.
        dts: (n,) int64 decoding timestamps in display order (``pts`` where the container gives none).
        key_positions: display positions of the key frames, ascending.
        open_gop: a packet after a key frame (in decoding order) is shown before it.
        ordered: the timestamps give the display order (False: some are missing or repeated, or the codec
            reorders frames that the packets say are in order, e.g. OpenCV's ``box.mp4``).
        end_pts: where the last frame ends (its pts plus its duration), None when unknown.
        width, height: the coded size the container reports (0 when unknown).
    """

    stream: int
    time_base: Fraction
    pts: np.ndarray
    decode_position: np.ndarray
    dts: np.ndarray
    key_positions: list[int]
    open_gop: bool
    ordered: bool
    end_pts: int | None
    width: int = 0
    height: int = 0

    @property
    def num_frames(self) -> int:
        """n, the frames the decoder outputs (packets that are not empty or marked to discard)."""
        return len(self.pts)

    def seconds(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The frames' own times in seconds from the first frame, ``(pts[i] - pts[0]) * time_base``."""
        ticks = self.pts[np.asarray(positions, np.int64)] - self.pts[0]
        return ticks.astype(np.float64) * (self.time_base.numerator / self.time_base.denominator)

    def end_seconds(self) -> float | None:
        """When the last frame ends, seconds from the first frame (None when unknown)."""
        if self.end_pts is None or not self.num_frames:
            return None
        return float((self.end_pts - int(self.pts[0])) * self.time_base)


def build_index(
    pts: Sequence[int | None],
    dts: Sequence[int | None],
    keys: Sequence[bool],
    durations: Sequence[int] = (),
    *,
    time_base: Fraction = Fraction(1),
    stream: int = 0,
    reorders: bool = False,
    width: int = 0,
    height: int = 0,
) -> StreamIndex:
    """A ``StreamIndex`` from the packets of one stream in decoding order (what ``demux_index`` reads).

    ``reorders`` is the decoder's "may reorder frames" flag (``has_b_frames``); with it, packets whose
    timestamps are strictly increasing in decoding order give ``ordered=False`` (checked further by
    ``demux_index``, which decodes a few frames).
    """
    n = len(pts)
    complete = all(p is not None for p in pts)
    if complete:
        in_decode_order = np.asarray(pts, np.int64)
    else:  # no usable timestamps: decoding order stands in for display order (ordered=False)
        in_decode_order = np.arange(n, dtype=np.int64)
    order = np.argsort(in_decode_order, kind="stable")
    display_pts = in_decode_order[order]
    unique = n < 2 or bool(np.all(np.diff(display_pts) > 0))
    increasing = n < 2 or bool(np.all(np.diff(in_decode_order) > 0))
    display_of = np.empty(n, np.int64)
    display_of[order] = np.arange(n)
    is_key = np.asarray(keys, bool).reshape(n)
    key_positions = sorted(int(p) for p in display_of[is_key])
    key_at = np.maximum.accumulate(np.where(is_key, np.arange(n), -1)) if n else np.zeros(0, np.int64)
    after_key = key_at >= 0
    open_gop = complete and bool(np.any(in_decode_order[after_key] < in_decode_order[key_at[after_key]]))
    decode_ts = np.asarray([p if d is None else d for p, d in zip(in_decode_order.tolist(), dts, strict=True)])
    end_pts = None
    if complete and n:
        last = int(order[-1])
        step = int(durations[last]) if len(durations) == n and durations[last] else 0
        if step <= 0 and n > 1:
            step = int(np.median(np.diff(display_pts)))
        end_pts = int(display_pts[-1]) + max(step, 0)
    return StreamIndex(
        stream=stream,
        time_base=time_base,
        pts=display_pts,
        decode_position=order.astype(np.int64),
        dts=decode_ts[order].astype(np.int64) if n else np.zeros(0, np.int64),
        key_positions=key_positions,
        open_gop=open_gop,
        ordered=complete and unique and not (reorders and increasing and n > 1),
        end_pts=end_pts,
        width=width,
        height=height,
    )


_ORDER_PROBE_FRAMES = 16  # frames decoded to tell whether a "reordering" codec really keeps packet order


def demux_index(path: str | Path) -> StreamIndex:
    """Read every packet of the video stream once (no decoding) and index the frames (see ``StreamIndex``).

    One exception: when the decoder may reorder frames (``has_b_frames``) but the packets' timestamps
    are strictly increasing in decoding order, the first frames are decoded to see whether the output
    order agrees (it does not in OpenCV's ``box.mp4``, whose container has no composition offsets).

    Raises:
        VideoError: FFmpeg cannot open or read the file, or it has no video stream.
    """
    av = _import_av()
    name = str(path)
    with _av_errors(name), av.open(name) as container:
        stream = container.streams.best("video")
        if stream is None:
            raise VideoError(f"cannot read video {name}: it has no video stream (or no frames)")
        pts: list[int | None] = []
        dts: list[int | None] = []
        keys: list[bool] = []
        durations: list[int] = []
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # end-of-stream flush packets; edit-list cuts
                continue
            pts.append(packet.pts)
            dts.append(packet.dts)
            keys.append(packet.is_keyframe)
            durations.append(packet.duration or 0)
        codec = stream.codec_context
        index = build_index(
            pts,
            dts,
            keys,
            durations,
            time_base=stream.time_base or Fraction(1),
            stream=stream.index,
            reorders=bool(codec.has_b_frames),
            width=int(codec.width or 0),
            height=int(codec.height or 0),
        )
    suspicious = not index.ordered and all(p is not None for p in pts) and len(set(pts)) == len(pts)
    if suspicious and _decoder_keeps_order(name, index.stream):  # (the only other reason it is unordered)
        return replace(index, ordered=True)
    return index


def _decoder_keeps_order(name: str, stream_index: int) -> bool:
    """Whether the first frames come out of the decoder with increasing timestamps."""
    av = _import_av()
    previous = None
    with _av_errors(name), av.open(name) as container:
        for count, frame in enumerate(container.decode(container.streams[stream_index])):
            if frame.pts is None or (previous is not None and frame.pts <= previous):
                return False
            previous = frame.pts
            if count + 1 >= _ORDER_PROBE_FRAMES:
                break
    return True


# -- planning the decode ---------------------------------------------------------------------------


def keyframe_targets(
    indices: Sequence[int], key_positions: Sequence[int], first: int = 0, last: int | None = None
) -> list[int]:
    """The frames ``seek="keyframe"`` returns for the sampled ``indices`` (ascending, distinct).

    Each index takes the key frame nearest to it (by display position, the earlier one on a tie) among
    the key frames within ``first..last`` (the sampling window). Where several indices have the same
    nearest key frame, the one closest to it takes it and the others keep their own (exact) frame; so
    the result is ascending and never repeats a frame. Without a key frame in the window, ``indices``.
    """
    keys = [k for k in sorted(set(key_positions)) if first <= k and (last is None or k <= last)]
    out = list(indices)
    if not keys or not out:
        return out
    members: dict[int, list[int]] = {}
    for j, index in enumerate(indices):
        above = bisect.bisect_left(keys, index)
        if above < len(keys) and keys[above] == index:
            nearest = index
        elif above == 0:
            nearest = keys[0]
        elif above == len(keys) or index - keys[above - 1] <= keys[above] - index:
            nearest = keys[above - 1]
        else:
            nearest = keys[above]
        members.setdefault(nearest, []).append(j)
    for key, group in members.items():
        winner = min(group, key=lambda j: (abs(indices[j] - key), indices[j]))
        out[winner] = key
    return out


@dataclass
class _Run:
    """One seek and a forward decode: from key frame ``key`` (display position; -1 for the start of the
    file) through the packets up to decoding position ``reach``, returning the frames ``targets``."""

    key: int
    start: int  # decoding position of the key frame (0 for the start of the file)
    reach: int
    targets: list[int]

    @property
    def cost(self) -> int:
        """Frames decoded: the packets from the key frame to the last one a target needs."""
        return self.reach - self.start + 1


def _plan(index: StreamIndex, targets: Sequence[int]) -> list[_Run]:
    """Seeks and forward decodes that return ``targets`` (ascending display positions).

    A target is decoded from the last key frame shown at or before it. It joins the previous run
    (no new seek) when that run already feeds the decoder its key frame (or the packet just before
    it): decoding on is never more work than seeking back to the key frame.
    """
    keys = index.key_positions
    runs: list[_Run] = []
    for target in targets:
        j = bisect.bisect_right(keys, target) - 1
        key = keys[j] if j >= 0 else -1
        start = int(index.decode_position[key]) if key >= 0 else 0
        need = int(index.decode_position[target])
        if runs and runs[-1].start <= start <= runs[-1].reach + 1:
            runs[-1].reach = max(runs[-1].reach, need)
            runs[-1].targets.append(target)
        else:
            runs.append(_Run(key, start, max(need, start), [target]))
    return runs


def _sequential_cost(index: StreamIndex, targets: Sequence[int]) -> int:
    """Frames decoded reading forward from the start up to the last target."""
    return int(index.decode_position[: max(targets) + 1].max()) + 1 if targets else 0


def _balanced(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` cut into at most ``workers`` contiguous groups of similar total cost."""
    workers = min(workers, len(costs))
    if workers <= 1:
        return [list(range(len(costs)))]
    target = sum(costs) / workers
    groups: list[list[int]] = [[]]
    load = 0.0
    for position, cost in enumerate(costs):
        if groups[-1] and load + cost / 2 > target and len(groups) < workers:
            groups.append([])
            load = 0.0
        groups[-1].append(position)
        load += cost
    return groups


def _cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


FRAMES_PER_READER = 400
"""Below this much work per reader (frames to decode) another reader costs more
(opening the file, building its index) than it saves (2 cores: a 20-s clip read 0.74 s with one reader,
0.95 s with two; a 3-min one 5.0 s and 3.6 s)."""


def decode_workers(segments: int | None = None, work: float | None = None) -> int:
    """Readers decoding at once: ``DYCOKE_DECODE_WORKERS`` when set to a positive integer, else
    ``min(CPUs, MAX_DECODE_WORKERS)`` and at most one per ``FRAMES_PER_READER`` of ``work`` (frames to
    decode) when given; never more than ``segments`` (the
    key-frame segments or seeks the sampled frames need) when given."""
    configured = os.environ.get("DYCOKE_DECODE_WORKERS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        workers = int(configured)
    else:
        workers = min(_cpu_count(), MAX_DECODE_WORKERS)
        if work is not None:
            workers = min(workers, max(1, int(work // FRAMES_PER_READER)))
    return max(1, min(workers, segments)) if segments is not None else workers


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
    return [[i for s in group for i in segments[s]] for group in _balanced(segment_costs, workers)]


# -- decoding with decord --------------------------------------------------------------------------


def _read_parallel(open_reader: Any, reader: Any | None, chunks: list[list[int]]) -> np.ndarray:
    """Decode each chunk with its own reader on its own thread (decord releases the GIL while it
    decodes); the first chunk uses ``reader`` when given, the others ``open_reader()``. Frames come
    back in the order of the chunks."""
    if len(chunks) == 1:
        return np.asarray((reader or open_reader()).get_batch(chunks[0]).asnumpy())

    def decode(job: tuple[int, list[int]]) -> np.ndarray:
        number, chunk = job
        own = reader if number == 0 and reader is not None else open_reader()
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


# -- decoding with PyAV ----------------------------------------------------------------------------


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


def _configure_threads(stream: Any, threads: int) -> None:
    """FFmpeg's own decoding threads for one container: frame and slice threading when it has cores."""
    codec = stream.codec_context
    codec.thread_count = max(1, threads)
    codec.thread_type = "AUTO" if threads > 1 else "SLICE"


def _rgb(frame: Any, size: tuple[int, int]) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 RGB at ``size`` = (H, W) (bicubic, FFmpeg's scale default)."""
    if (frame.height, frame.width) == size:
        return np.asarray(frame.to_ndarray(format="rgb24"))
    return np.asarray(frame.to_ndarray(format="rgb24", width=size[1], height=size[0], interpolation="BICUBIC"))


def _seek(
    container: Any, stream: Any, index: StreamIndex, run: _Run, position_of: dict[int, int]
) -> tuple[Any, Iterator[Any]]:
    """Seek so that demuxing starts at (or before) the run's key frame.

    Returns the first packet and the iterator of the ones after it. Demuxers seek by pts (Matroska)
    or by dts (MP4, AVI): the key frame's pts is tried first, then its dts, then earlier key frames,
    then the start of the file; a landing is accepted when the first packet is at or before the key
    frame in decoding order (``position_of``: pts -> decoding position).
    """
    tries: list[int | None] = []
    if run.key >= 0:
        tries += [int(index.pts[run.key]), int(index.dts[run.key])]
        earlier = [k for k in index.key_positions if k < run.key][-2:]
        tries += [int(index.pts[k]) for k in reversed(earlier)]
    tries.append(None)
    for timestamp in dict.fromkeys(tries):
        if timestamp is None:
            container.seek(0, backward=True)  # the start, in AV_TIME_BASE units
        else:
            container.seek(timestamp, stream=stream, backward=True, any_frame=False)
        packets = iter(container.demux(stream))
        for first in packets:
            if first.size == 0 and first.pts is None:
                break  # end of the stream: seeking went past everything
            if first.is_discard or first.size == 0:
                continue
            position = position_of.get(first.pts)
            if timestamp is None or (position is not None and position <= run.start):
                return first, packets
            break
    raise _SeekFailed(f"seeking to frame {run.targets[0]} did not land at or before its key frame")


def _decode_runs(
    name: str, index: StreamIndex, runs: Sequence[_Run], size: tuple[int, int], threads: int
) -> dict[int, np.ndarray]:
    """Decode the targets of ``runs`` with one PyAV container: per run, one seek and a forward decode
    up to the run's last target, frames matched by pts. Returns {display position: frame}."""
    av = _import_av()
    out: dict[int, np.ndarray] = {}
    with _av_errors(name), av.open(name) as container:
        stream = container.streams[index.stream]
        _configure_threads(stream, threads)
        position_of = dict(zip(index.pts.tolist(), index.decode_position.tolist(), strict=True))
        for run in runs:
            wanted = {int(index.pts[t]): t for t in run.targets}
            last = int(index.pts[run.targets[-1]])
            first, packets = _seek(container, stream, index, run, position_of)
            previous: int | None = None
            for packet in itertools.chain([first], packets):
                for frame in packet.decode():
                    pts = frame.pts
                    if pts is None or (previous is not None and pts <= previous):
                        raise _SeekFailed(f"the decoder returned frames out of timestamp order near {previous}")
                    previous = pts
                    position = wanted.pop(pts, None)
                    if position is not None:
                        out[position] = _rgb(frame, size)
                if not wanted or (previous is not None and previous >= last):
                    break
            if wanted:
                missing = min(wanted.values())
                raise _SeekFailed(f"frame {missing} did not come out of the decoder after seeking")
    return out


def _read_pyav(
    name: str, index: StreamIndex, runs: list[_Run], size: tuple[int, int], workers: int
) -> tuple[np.ndarray, int]:
    """Decode the runs' targets, the runs dealt out to ``workers`` threads as contiguous groups balanced
    by cost, each with its own container. Returns (frames in target order, readers used)."""
    groups = _balanced([r.cost for r in runs], workers)
    threads = max(1, _cpu_count() // len(groups))
    jobs = [[runs[i] for i in group] for group in groups]
    if len(jobs) == 1:
        found = _decode_runs(name, index, jobs[0], size, threads)
    else:
        found = {}
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="dycoke-video") as pool:
            for part in pool.map(lambda job: _decode_runs(name, index, job, size, threads), jobs):
                found.update(part)
    targets = [t for r in runs for t in r.targets]
    return np.stack([found[t] for t in targets]), len(jobs)


def _read_sequential(name: str, index: StreamIndex, targets: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Decode forward from the start, the i-th frame out of the decoder being frame i (no seeking, no
    timestamps): for files whose timestamps cannot be trusted."""
    av = _import_av()
    wanted = set(targets)
    out: dict[int, np.ndarray] = {}
    last = max(targets)
    with _av_errors(name), av.open(name) as container:
        stream = container.streams[index.stream]
        _configure_threads(stream, _cpu_count())
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                out[position] = _rgb(frame, size)
            if position >= last:
                break
    if len(out) < len(wanted):
        missing = min(wanted - out.keys())
        raise VideoError(f"cannot read video {name}: the decoder stopped before frame {missing} (truncated file?)")
    return np.stack([out[t] for t in targets])


# -- read_video ------------------------------------------------------------------------------------


def _uniform_times(index: StreamIndex, source_fps: float) -> bool:
    """Whether every frame's own time is within half a frame of ``i / source_fps``."""
    if not index.ordered or index.num_frames < 2:
        return True
    nominal = np.arange(index.num_frames) / source_fps
    return bool(np.max(np.abs(index.seconds(np.arange(index.num_frames)) - nominal)) <= 0.5 / source_fps)


def read_video(
    path: str | Path,
    *,
    num_frames: int = 32,
    fps: float | None = None,
    max_frames: int = 64,
    start_s: float | None = None,
    end_s: float | None = None,
    min_decode_side: int | None = DEFAULT_MIN_DECODE_SIDE,
    seek: str = "exact",
) -> VideoFrames:
    """Decode the sampled frames of a video (see the module docstring for which frames and sizes).

    Args:
        path: any file FFmpeg reads (mp4, mkv, avi, webm, ...).
        num_frames: frames spread uniformly over the video or window (used when ``fps`` is None).
        fps: sample this many frames per second of video instead, at most ``max_frames``.
        max_frames: cap for ``fps`` sampling.
        start_s, end_s: time window in seconds (default: the whole video).
        min_decode_side: decode big videos downscaled to this shorter side; None for full size.
        seek: ``"exact"`` (the sampled frames themselves, the paper's evaluation) or ``"keyframe"``
            (for each sampled frame the nearest key frame in the window, cheaper to decode; see
            ``keyframe_targets``).

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
    if seek not in SEEK_MODES:
        raise ConfigError(f"seek must be one of {', '.join(SEEK_MODES)}, got {seek!r}")
    name = str(path)
    file = Path(path)
    if not file.exists():
        raise VideoError(f"video not found: {name}")
    if file.is_dir():
        raise VideoError(f"video path is a directory, not a file: {name}")
    decord = _import_decord()

    warnings: list[str] = []
    with _decord_errors(name, warnings):
        probe = decord.VideoReader(name, num_threads=_cpu_count())
        decord_total = len(probe)
        source_fps = _frame_rate(probe, decord_total, name)
        decord_end = float(probe.get_frame_timestamp([decord_total - 1])[0][1])
        decord_keys = sorted(int(k) for k in probe.get_key_indices())
        try:
            first_frame = probe.next().asnumpy()  # the size decord decodes at (and proof that it decodes)
        except StopIteration:
            raise VideoError(f"cannot read video {name}: no frame could be decoded (not a video file?)") from None
    source_size = (int(first_frame.shape[0]), int(first_frame.shape[1]))
    del first_frame
    index = demux_index(name)
    if index.num_frames == 0:
        raise VideoError(f"cannot read video {name}: the video stream has no decodable frames")
    total = index.num_frames
    duration = total / source_fps
    exact_times = _uniform_times(index, source_fps)

    def times(positions: Sequence[int]) -> list[float]:
        if exact_times:
            return [i / source_fps for i in positions]
        return [float(t) for t in index.seconds(positions)]

    index_end = index.end_seconds() if index.ordered else None
    last_end = decord_end if index_end is None else index_end
    if math.isfinite(last_end) and last_end > 0 and abs(last_end - duration) > max(0.1 * duration, 2 / source_fps):
        warnings.append(
            f"variable frame rate: the frames' own timestamps end at {last_end:.3f} s, not at "
            f"{duration:.3f} s ({total} frames at {source_fps:.3f} fps); the window and sampling assume a "
            f"constant rate, timestamps_s are the frames' own"
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

    keyframe_indices = keyframe_targets(indices, index.key_positions, first, last)
    exact_runs, keyframe_runs = _plan(index, indices), _plan(index, keyframe_indices)
    if index.ordered:
        cost = {
            "exact_frames_decoded": sum(r.cost for r in exact_runs),
            "keyframe_frames_decoded": sum(r.cost for r in keyframe_runs),
            "exact_seeks": len(exact_runs),
            "keyframe_seeks": len(keyframe_runs),
        }
    else:  # read forward from the start in either mode
        sequential = _sequential_cost(index, indices)
        cost = {"exact_frames_decoded": sequential, "keyframe_frames_decoded": sequential}
        cost |= {"exact_seeks": 0, "keyframe_seeks": 0}
    if seek == "keyframe" and index.ordered:
        targets, runs = keyframe_indices, keyframe_runs
    else:
        targets, runs = list(indices), exact_runs
        if seek == "keyframe":
            warnings.append("keyframe seeking needs timestamps this file lacks: decoded the exact frames instead")

    decoded_size = decode_size(*source_size, min_decode_side)
    work = sum(r.cost for r in runs)  # frames to decode (big frames gain from FFmpeg's own threads instead)
    decord_agrees = decord_total == total and decord_keys == index.key_positions
    if index.ordered and not index.open_gop and decord_agrees:
        decoder = "decord"

        chunks = keyframe_chunks(targets, index.key_positions, decode_workers(len(runs), work))
        threads = max(1, _cpu_count() // len(chunks))  # FFmpeg's decoding threads per reader

        def _open() -> Any:
            if decoded_size == source_size:
                return decord.VideoReader(name, num_threads=threads)
            return decord.VideoReader(name, width=decoded_size[1], height=decoded_size[0], num_threads=threads)

        with _decord_errors(name, warnings, capture_native=False):
            # the probe (all CPUs' threads, has not sought yet) serves when it alone reads at full size
            reader = probe if decoded_size == source_size and len(chunks) == 1 else None
            del probe
            frames = _read_parallel(_open, reader, chunks)
        readers = len(chunks)
    else:
        del probe
        read: np.ndarray | None = None
        if index.ordered:
            decoder = "pyav"
            try:
                read, readers = _read_pyav(name, index, runs, decoded_size, decode_workers(len(runs), work))
            except _SeekFailed as exc:
                warnings.append(f"seeking by timestamp failed ({exc}): decoded forward from the start instead")
        if read is None:
            decoder, readers = "sequential", 1
            if not index.ordered:
                warnings.append(
                    "the packets' timestamps do not give this video's display order: decoded it forward "
                    f"from the start up to frame {targets[-1]}"
                )
            read = _read_sequential(name, index, targets, decoded_size)
        frames = read
    cost["readers"] = readers
    if frames.shape != (len(targets), decoded_size[0], decoded_size[1], 3):
        raise VideoError(f"cannot read video {name}: decoder returned frames of shape {frames.shape}")
    returned_times, asked_times = times(targets), times(indices)
    return VideoFrames(
        frames=frames,
        indices=list(targets),
        timestamps_s=returned_times,
        source_fps=source_fps,
        source_num_frames=total,
        duration_s=duration,
        source_size=source_size,
        decoded_size=decoded_size,
        warnings=warnings,
        seek=seek,
        max_shift_s=max((abs(a - b) for a, b in zip(returned_times, asked_times, strict=True)), default=0.0),
        decode_cost=cost,
        decoder=decoder,
    )
