"""Which frames of a video the model sees, and reading them exactly (PyAV seeking by timestamp, or decord).

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

Three decoders, chosen from the index and the ``decoder`` option (``VideoFrames.decoder`` says which):

- ``pyav``, seeking by timestamp, wherever the timestamps give the display order (the default,
  ``decoder="auto"``): ``container.seek``
  to the key frame shown at or before the frame (by its pts, then its dts - MP4 and AVI demuxers seek
  by dts, Matroska by pts - then earlier key frames, then the start, until the demuxer lands at or
  before it), decode forward to the frame whose pts is the target's, convert it to RGB at the decode
  size. Sampled frames decoded from the same key frame (and the next one, when the decoder has already
  been fed its key frame) share one forward pass. Right for open and closed GOPs alike.
- ``decord`` (``decoder="decord"``), where its seeking is right: closed GOPs, and decord's frame count
  and key-frame indices equal the index's (elsewhere ``pyav``). decord locates key frames by their
  position in *decoding* order and uses it as a *display* index; the two agree for closed GOPs only
  (x264's default, most H.264/H.265 MP4s, VP9). For open GOPs a decord seek lands a few frames off (+1
  or +2 frames with 1 or 2 B-frames, measured). ``get_batch`` seeks to the key frame before each frame
  and decodes forward. It was the default until PyAV measured faster on every clip where both are
  right, with the same frames at full size (3-min 1080p H.264, 32 exact frames, 3566 frames to decode:
  16 CPUs 0.79 s against decord's best split 0.92 s; 2 CPUs 3.39 s against 4.73 s), since a PyAV reader
  opens in milliseconds where each decord reader first builds its own index of the whole file.
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
threads, each with its own PyAV container or decord reader (both decode without holding the GIL).
PyAV: one reader per ``FRAMES_PER_SEEKING_READER=25`` frames of work (a seek counting as
``SEEK_COST_FRAMES=5``), at most one per CPU and one per
forward pass; decord: one per ``FRAMES_PER_READER=400`` frames, at most ``min(CPUs,
MAX_DECODE_WORKERS=8)``; ``DYCOKE_DECODE_WORKERS=N`` overrides both. FFmpeg's own decoding threads per
reader are the CPUs divided among the readers (measured: more readers of one thread beat fewer readers
of several, whose frame threads restart at every seek). The frames are the same with any number of
readers. Each reader puts its frames straight into the returned array (``readers.FrameStore``):
stacking them afterwards copied them all again, on one thread, into memory not yet touched (128 frames
of 720p, 354 MB: 0.08-0.36 s on 2 cores, against 0.04-0.05 s placed by four threads).
decord's probe (frame rate, size, the first frame) and the demux pass run at the same time.

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
only for the few frames just before each key frame). The same measurements of the PyAV path, forced on
the closed-GOP ones, were faster than decord again (180 s exact: 4.50 s against 4.99 s); it is now the
default everywhere ("Three decoders" above, and ``benchmarks/results/video-*.md`` for today's figures).

Reduced-size decoding. The model resizes every frame to 384x384 (bicubic, antialias). A 4K or 8K
source is not held at full size: when the shorter side exceeds ``min_decode_side`` the frames are
decoded already downscaled (PyAV: converted to RGB at full size, then scaled by swscale, bicubic;
decord: its FFmpeg scale filter) to a shorter side of ``min_decode_side``
(rounded up to even), the longer side keeping the aspect ratio (rounded to even); never upscaled.
32 frames of 4K at full size are 796 MB, at the default 768 they are 101 MB (1366x768).
The FFmpeg decoder still decodes full frames internally; a full-size RGB frame exists only while one
frame is converted, per reader, plus the first one, decoded by decord's probe to learn the size it
decodes at and that it can decode the file.

Measured pixel effect of decord's scale filter (decord 0.6.0, torch 2.13 CPU): frames decoded reduced
then resized to 384x384 (``interpolate(mode="bicubic", antialias=True)``, rounded) versus decoded full
size then resized the same way, absolute difference in 0..255 units over all pixels and channels:

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

The PyAV path (the default) is far closer: converting to RGB at full size first, then scaling the RGB
frame, leaves almost nothing of that error (scaling the YUV planes and converting in one swscale pass,
as ``to_ndarray(width=, height=)`` does, is about 6x further off: max 31 / mean 1.90 at 768 on the
1080p texture). Measured (FFmpeg 8 via PyAV 18, 2026-12), same metric, PyAV reduced against full size ;
PyAV reduced against decord reduced:

=====================================  =====================  =====================  =====================
source (x264 CRF 12)                   shorter side 384       shorter side 576       shorter side 768
=====================================  =====================  =====================  =====================
synthetic texture 1920x1080            10 / 0.66 ; 44 / 4.58  10 / 0.46 ; 27 / 2.47   4 / 0.20 ; 15 / 1.64
synthetic texture 3840x2160            11 / 0.52 ; 51 / 5.20  13 / 0.58 ; 27 / 2.87   4 / 0.23 ; 17 / 1.83
Big Buck Bunny 1280x720 (real)          3 / 0.21 ; 43 / 1.18   4 / 0.15 ; 20 / 0.88  (not reduced)
=====================================  =====================  =====================  =====================

(max / mean in 0..255 levels after the 384x384 resize.) The conversion costs about 23 ms a 1080p
frame instead of 12, on the reader's thread, for the returned frames only. At full size the two
decoders' frames are identical (Big Buck Bunny, and every synthetic clip of the tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from dycoke.errors import ConfigError, VideoError
from dycoke.video.index import StreamIndex, build_index, demux_index
from dycoke.video.native import _decord_errors, _frame_rate, _import_decord, _SeekFailed
from dycoke.video.plan import (
    MAX_DECODE_WORKERS,
    _cpu_count,
    _plan,
    _sequential_cost,
    decode_workers,
    keyframe_chunks,
    keyframe_targets,
)
from dycoke.video.readers import FrameSink, FrameStore, _read_parallel, _read_pyav, _read_sequential
from dycoke.video.sampling import (
    _SNAP,
    DEFAULT_MIN_DECODE_SIDE,
    SEEK_MODES,
    VIDEO_DECODERS,
    VideoFrames,
    _check_count,
    _check_rate,
    _check_window,
    _fps_samples,
    decode_size,
    fps_indices,
    frame_window,
    uniform_indices,
)

__all__ = [
    "DEFAULT_MIN_DECODE_SIDE",
    "MAX_DECODE_WORKERS",
    "SEEK_MODES",
    "VIDEO_DECODERS",
    "StreamIndex",
    "VideoFrames",
    "build_index",
    "decode_size",
    "decode_workers",
    "demux_index",
    "fps_indices",
    "frame_window",
    "keyframe_chunks",
    "keyframe_targets",
    "read_video",
    "uniform_indices",
]

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
    decoder: str = "auto",
    sink: FrameSink | None = None,
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
        decoder: ``"auto"`` (PyAV seeking by timestamp wherever the timestamps give the display order,
            see "Three decoders"), ``"decord"`` (decord's ``get_batch`` where its index agrees with the demuxed
            one and GOPs are closed, else as auto) or ``"pyav"`` (same as auto).
        sink: where the frames go, told of each as it lands (``readers.FrameSink``; ``dycoke.frame_stream``
            reads into shared memory with one); the returned ``frames`` is then the sink's array.

    Returns:
        VideoFrames with ``frames`` of shape (F, H, W, 3), uint8 RGB.

    Raises:
        ConfigError: an option out of range (``num_frames``/``max_frames`` < 1, ``fps`` <= 0, ...), an
            unknown ``seek`` or ``decoder``.
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
    if decoder not in VIDEO_DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(VIDEO_DECODERS)}, got {decoder!r}")
    name = str(path)
    file = Path(path)
    if not file.exists():
        raise VideoError(f"video not found: {name}")
    if file.is_dir():
        raise VideoError(f"video path is a directory, not a file: {name}")
    decord = _import_decord()

    warnings: list[str] = []
    # the demux pass (PyAV, packets only) runs beside decord's probe: neither needs the other
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dycoke-demux") as pool:
        demuxing = pool.submit(demux_index, name)
        try:
            with _decord_errors(name, warnings):
                probe = decord.VideoReader(name, num_threads=_cpu_count())
                decord_total = len(probe)
                source_fps = _frame_rate(probe, decord_total, name)
                decord_end = float(probe.get_frame_timestamp([decord_total - 1])[0][1])
                decord_keys = sorted(int(k) for k in probe.get_key_indices())
                try:
                    first_frame = probe.next().asnumpy()  # the size decord decodes at (proof that it decodes)
                except StopIteration:
                    raise VideoError(
                        f"cannot read video {name}: no frame could be decoded (not a video file?)"
                    ) from None
        except BaseException:
            demuxing.cancel()
            wait([demuxing])  # decord's error is the one reported
            raise
        index = demuxing.result()
    source_size = (int(first_frame.shape[0]), int(first_frame.shape[1]))
    del first_frame
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
    if decoder == "decord" and index.ordered and not index.open_gop and decord_agrees:
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
            frames = _read_parallel(_open, reader, chunks, FrameStore(name, targets, decoded_size, sink))
        readers = len(chunks)
    else:
        del probe
        read: np.ndarray | None = None
        if index.ordered:
            decoder = "pyav"
            try:
                workers = decode_workers(len(runs), work, seeking=True)
                read, readers = _read_pyav(name, index, runs, decoded_size, workers, sink=sink)
            except _SeekFailed as exc:
                warnings.append(f"seeking by timestamp failed ({exc}): decoded forward from the start instead")
        if read is None:
            decoder, readers = "sequential", 1
            if not index.ordered:
                warnings.append(
                    "the packets' timestamps do not give this video's display order: decoded it forward "
                    f"from the start up to frame {targets[-1]}"
                )
            read = _read_sequential(name, index, targets, decoded_size, sink)
        frames = read
    cost["readers"] = readers  # every frame's size was checked as the readers stored it (FrameStore.put)
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
