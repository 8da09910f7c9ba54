"""Which frames of a video the model sees: pure frame selection, the decode size, and ``VideoFrames``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from dycoke.errors import ConfigError, VideoError

DEFAULT_MIN_DECODE_SIDE = 768
"""Frames whose shorter side is larger are decoded downscaled to this shorter side (see module doc)."""

SEEK_MODES = ("exact", "keyframe")
VIDEO_DECODERS = ("auto", "pyav", "decord")
"""``read_video(seek=...)``: the sampled frames themselves, or the nearest key frames (see module doc)."""

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
