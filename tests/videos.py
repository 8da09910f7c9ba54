"""Synthetic test videos with known content, written with PyAV.

``numbered_frames`` draws a bar code of ``NUMBER_BITS`` vertical stripes (white = 1, black = 0, most
significant bit on the left) so that every frame carries its own index; ``frame_number`` reads it
back from a decoded frame, at any decoded size. The stripes are wide and saturated, so the code
survives lossy encoding, chroma subsampling and downscaling: decoding with decord returns exactly
the index written.

``write_video`` encodes an (F, H, W, 3) uint8 RGB array with libx264 (near-lossless CRF, B-frames
and a short GOP, so that seeking crosses key frames; closed GOPs unless ``open_gop``), libx265 (open
GOPs, its default, unless ``open_gop=False``), libvpx-vp9 or mpeg4 (low qscale) into an
mp4/mkv/avi/webm, at a constant rate or at explicit (variable) timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

NUMBER_BITS = 12  # indices 0..4095


def numbered_frames(n: int, height: int, width: int, *, bits: int = NUMBER_BITS) -> np.ndarray:
    """``n`` RGB frames whose content encodes the frame index.

    Args:
        n: number of frames (at most ``2**bits``).
        height, width: frame size (even numbers for yuv420p; ``width >= 4 * bits`` so stripes stay wide).
        bits: number of stripes.

    Returns:
        (n, height, width, 3) uint8: frame i is ``bits`` vertical stripes, stripe k white when bit
        ``bits-1-k`` of i is set, black otherwise.
    """
    if n > 2**bits:
        raise ValueError(f"{n} frames do not fit in {bits} bits")
    if width < 4 * bits:
        raise ValueError(f"width {width} is too small for {bits} stripes (needs >= {4 * bits})")
    edges = np.linspace(0, width, bits + 1).round().astype(int)
    stripe_of_column = np.searchsorted(edges, np.arange(width), side="right") - 1  # (W,)
    index = np.arange(n)[:, None]  # (n, 1)
    shift = (bits - 1 - stripe_of_column)[None, :]  # (1, W)
    on = (index >> shift) & 1  # (n, W)
    rows = (on * 255).astype(np.uint8)  # (n, W)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :, None], (n, height, width, 3)))


def frame_number(frame: np.ndarray, *, bits: int = NUMBER_BITS) -> int:
    """Read back the index drawn by ``numbered_frames`` from one decoded (H, W, 3) RGB frame.

    Each stripe is sampled over its middle half (away from edges blurred by the codec or a resize)
    and thresholded at mid-gray.
    """
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=2)  # (H, W)
    edges = np.linspace(0, width, bits + 1)
    value = 0
    for k in range(bits):
        lo, hi = edges[k], edges[k + 1]
        a, b = int(lo + (hi - lo) / 4), max(int(lo + (hi - lo) / 4) + 1, int(hi - (hi - lo) / 4))
        level = gray[height // 4 : max(height // 4 + 1, 3 * height // 4), a:b].mean()
        value = (value << 1) | int(level > 127.5)
    return value


def textured_frames(n: int, height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """``n`` frames of detailed texture: noise at several scales, sharp edges and fine line patterns.

    Meant for measuring what reduced-size decoding changes: every spatial frequency up to the pixel
    grid is present. Each frame shifts the pattern a little so the frames differ.

    Returns:
        (n, height, width, 3) uint8 RGB.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((n, height, width, 3), np.uint8)
    # Multi-scale smooth noise: random coarse grids upsampled by nearest-neighbour then blurred by
    # summing shifted copies (cheap, no scipy).
    base = np.zeros((height, width, 3), np.float32)
    for cell, amp in ((256, 60.0), (64, 40.0), (16, 30.0), (4, 20.0), (1, 12.0)):
        gh, gw = height // cell + 2, width // cell + 2
        grid = rng.standard_normal((gh, gw, 3)).astype(np.float32)
        up = np.repeat(np.repeat(grid, cell, axis=0), cell, axis=1)[:height, :width]
        base += amp * up
    for i in range(n):
        t = float(i)
        rings = 40.0 * np.sin(((xx - width / 2) ** 2 + (yy - height / 2) ** 2) * (0.0004 + 0.00002 * t))
        lines = 35.0 * np.sign(np.sin(xx * 0.9 + yy * 0.35 + t))  # fine, sharp diagonal stripes
        checker = 30.0 * (((xx.astype(int) // 24 + yy.astype(int) // 24 + i) % 2) * 2 - 1)
        img = 128.0 + np.roll(base, shift=(3 * i, 5 * i), axis=(0, 1))
        img += (rings + lines + checker)[..., None] * np.array([1.0, 0.7, 0.4], np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def has_encoder(name: str) -> bool:
    """Whether this PyAV build can encode with ``name`` (e.g. ``libx265``, ``libvpx-vp9``)."""
    try:
        return av.Codec(name, "w") is not None
    except Exception:  # av.codec.codec.UnknownCodecError
        return False


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float | Fraction,
    *,
    codec: str = "libx264",
    crf: int = 10,
    gop: int = 12,
    bframes: int = 2,
    pts_step: int = 1,
    open_gop: bool | None = None,
    pts: Sequence[int] | None = None,
) -> Path:
    """Encode RGB frames into a video file.

    Args:
        path: output file; the container follows the extension (.mp4, .mkv, .avi, .webm, ...).
        frames: (F, H, W, 3) uint8 RGB, H and W even.
        fps: frame rate; pass a ``Fraction`` (e.g. ``Fraction(30000, 1001)``) for exact NTSC rates.
        codec: ``libx264`` / ``libx265`` (CRF ``crf``, ``bframes`` B-frames, key frame every ``gop``
            frames, no scene-cut key frames), ``libvpx-vp9`` (CRF ``crf``, key frame every ``gop``
            frames, no B-frames in VP9) or ``mpeg4`` (qscale 2, same GOP).
        crf, gop, bframes: encoder settings (see above).
        pts_step: frame i gets timestamp ``i * pts_step / fps``; above 1 the stream still declares
            ``fps`` but the frames are spaced wider (a variable-frame-rate-like file, e.g. in .mkv).
        open_gop: x264/x265 open GOPs (frames after a key frame in decoding order that are shown before
            it and reference the previous GOP); default: each encoder's own default (x264 closed, x265 open).
        pts: explicit timestamps in units of ``1 / fps``, one per frame, increasing (variable frame rate);
            overrides ``pts_step``.

    Returns:
        The path written.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if pts is not None and len(pts) != len(frames):
        raise ValueError(f"{len(pts)} timestamps for {len(frames)} frames")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        assert isinstance(stream, av.VideoStream)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec != "libvpx-vp9":
            stream.codec_context.max_b_frames = bframes
        if codec == "libx264":
            # scenecut=0: key frames exactly every ``gop`` frames (the bar codes look like scene cuts)
            params = "scenecut=0" + (":open-gop=1:b-adapt=0" if open_gop else "")
            stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": params}
        elif codec == "libx265":
            params = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:log-level=error"
            params += "" if open_gop is None else f":open-gop={int(open_gop)}"
            stream.options = {"crf": str(crf), "preset": "veryfast", "x265-params": params}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:  # fixed quantiser 2 (FFmpeg's -q:v 2): qscale flag + quality in lambda units (118 per qp)
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = 2 * 118
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None or pts_step != 1:
                frame.pts = int(pts[i]) if pts is not None else i * pts_step
                frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_numbered_video(
    path: str | Path,
    n: int,
    fps: float | Fraction = 25,
    *,
    height: int = 64,
    width: int = 96,
    codec: str = "libx264",
) -> Path:
    """Write an ``n``-frame video whose frame i shows the bar code of i (see ``numbered_frames``)."""
    return write_video(path, numbered_frames(n, height, width), fps, codec=codec)
