"""The demux index: one pass over a video stream's packets (no decoding) with PyAV: display order,
key frames, open GOPs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from dycoke.errors import VideoError
from dycoke.video.native import _av_errors, _import_av

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
