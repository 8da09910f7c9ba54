"""Make the synthetic clip corpus that ``bench_video.py`` reads.

    python benchmarks/make_video_corpus.py --out .corpus                    # every clip, full length
    python benchmarks/make_video_corpus.py --out .corpus-quick --scale 0.05 # tiny clips, to try the scripts
    python benchmarks/make_video_corpus.py --out .corpus --only h264-4k-20s.mp4 --overwrite

The corpus folder must stay out of git (the full corpus is 1 to 2 GB: x264 ultrafast spends bits): put it outside the
repository or in a folder that ``.gitignore`` lists.

Clips (30 fps unless said; x264 and x265 at ``-preset ultrafast``, ``--preset`` changes it; x264's
ultrafast has no B-frames, so its GOPs are I P P P ...):

=============================  ==========================================================================
``h264-1080p-3min.mp4``        3 min 1920x1080 H.264, key frame every 250 frames, no scenecut, closed GOP
``h264-1080p-10min.mp4``       10 min, same settings
``hevc-1080p-30s-opengop.mp4`` 30 s 1080p HEVC, x265's GOP defaults (keyint 250, open GOP: CRA key
                               frames with leading B-frames); skipped when there is no libx265 encoder
``h264-4k-20s.mp4``            20 s 3840x2160 H.264 (same x264 settings)
``vp9-720p-20s.webm``          20 s 1280x720 VP9 (``deadline=realtime``, ``cpu-used=8``, key frame every
                               250 frames); skipped when there is no libvpx-vp9 encoder
``h264-portrait-20s.mp4``      20 s 1080x1920 H.264
``h264-vfr-20s.mp4``           20 s 1080p H.264, variable frame rate: frame gaps alternate 1/30 s and
                               1/10 s (300 frames, 15 fps on average)
=============================  ==========================================================================

Generator: ``ffmpeg`` when it is on PATH, PyAV otherwise (``--generator`` picks one).
ffmpeg: the ``testsrc2`` source with its hue turned 12 degrees a frame (``hue=H=2*PI*t``; plain testsrc2
frames differ from the next by only 2.4 levels on average at 4K, too close to ``bench_video.py``'s 2-level
equality threshold to tell a frame one position off; with the hue turn, 10 or more).
PyAV: synthetic YUV frames built with numpy (sawtooth gradients scrolling 8 pixels a frame, a moving box,
the frame number in binary as a row of black/white blocks at the top left), so consecutive frames differ
by about 15 levels.

``--scale S`` multiplies every duration by S (``0.05``: the 10 min clip becomes 30 s). A clip already in
the folder is skipped unless ``--overwrite`` (a clip is written under a temporary name and renamed when
complete, so an interrupted run leaves no truncated clip). ``corpus.json`` in the folder records how each
clip was made; ``bench_video.py`` copies it into its results.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

FPS = 30
KEYINT = 250
X264_PARAMS = f"keyint={KEYINT}:scenecut=0:open-gop=0"
MANIFEST = "corpus.json"
HUE_FILTER = "hue=H=2*PI*t"  # testsrc2's hue turned 12 degrees a frame: consecutive frames differ by 10+ levels


@dataclass(frozen=True)
class Clip:
    """One clip of the corpus."""

    name: str
    seconds: float
    width: int
    height: int
    encoder: str  # FFmpeg encoder name: libx264, libx265 or libvpx-vp9
    vfr: bool = False

    def num_frames(self, scale: float) -> int:
        """Frames in the clip at ``scale``: 30 a second, or 15 a second on average for the VFR clip."""
        rate = 15 if self.vfr else FPS
        return max(2, round(self.seconds * scale * rate))


CLIPS: list[Clip] = [
    Clip("h264-1080p-3min.mp4", 180, 1920, 1080, "libx264"),
    Clip("h264-1080p-10min.mp4", 600, 1920, 1080, "libx264"),
    Clip("hevc-1080p-30s-opengop.mp4", 30, 1920, 1080, "libx265"),
    Clip("h264-4k-20s.mp4", 20, 3840, 2160, "libx264"),
    Clip("vp9-720p-20s.webm", 20, 1280, 720, "libvpx-vp9"),
    Clip("h264-portrait-20s.mp4", 20, 1080, 1920, "libx264"),
    Clip("h264-vfr-20s.mp4", 20, 1920, 1080, "libx264", vfr=True),
]


def vfr_pts(i: int) -> int:
    """Presentation time of frame ``i`` of the VFR clip in 1/30 s: gaps alternate 1 and 3 (1/30 s, 1/10 s)."""
    return (i // 2) * 4 + (i % 2)


# -- encoder settings ------------------------------------------------------------------------------


def ffmpeg_codec_args(encoder: str, preset: str) -> list[str]:
    """The ffmpeg command-line options of an encoder (same settings as ``pyav_codec_options``)."""
    if encoder == "libx264":
        return ["-c:v", "libx264", "-preset", preset, "-x264-params", X264_PARAMS]
    if encoder == "libx265":
        return ["-c:v", "libx265", "-preset", preset, "-x265-params", "log-level=error", "-tag:v", "hvc1"]
    if encoder == "libvpx-vp9":
        return ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1"]
    raise ValueError(f"unknown encoder {encoder}")


def pyav_codec_options(encoder: str, preset: str) -> dict[str, str]:
    """The PyAV (libavcodec) options of an encoder."""
    if encoder == "libx264":
        return {"preset": preset, "x264-params": X264_PARAMS}
    if encoder == "libx265":
        return {"preset": preset, "x265-params": "log-level=error"}
    if encoder == "libvpx-vp9":
        return {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"}
    raise ValueError(f"unknown encoder {encoder}")


def gop_size(encoder: str) -> int | None:
    """The key-frame interval to impose, or None for the encoder's own (x265's default is 250)."""
    return KEYINT if encoder == "libvpx-vp9" else None  # libvpx on its own puts one every 128 frames


# -- ffmpeg generator ------------------------------------------------------------------------------


def ffmpeg_encoders(ffmpeg: str) -> set[str]:
    out = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, check=False).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] in "VAS.":
            names.add(parts[1])
    return names


def ffmpeg_command(ffmpeg: str, clip: Clip, frames: int, out: Path, *, preset: str, vsync_option: str) -> list[str]:
    seconds = frames / FPS + 1  # testsrc2 makes more than enough; -frames:v cuts
    source = f"testsrc2=size={clip.width}x{clip.height}:rate={FPS}:duration={seconds:.3f}"
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", source]
    filters = [HUE_FILTER]
    if clip.vfr:
        filters.append(r"setpts=(floor(N/2)*4+mod(N\,2))/(30*TB)")
    cmd += ["-vf", ",".join(filters)]
    if clip.vfr:
        cmd += [vsync_option, "passthrough"]
    if gop_size(clip.encoder) is not None:
        cmd += ["-g", str(gop_size(clip.encoder))]
    cmd += [*ffmpeg_codec_args(clip.encoder, preset), "-pix_fmt", "yuv420p", "-frames:v", str(frames), "-an", str(out)]
    return cmd


def make_with_ffmpeg(ffmpeg: str, clip: Clip, frames: int, out: Path, preset: str) -> list[str]:
    """Encode ``clip`` with ffmpeg into ``out``; returns the command that ran."""
    cmd = ffmpeg_command(ffmpeg, clip, frames, out, preset=preset, vsync_option="-fps_mode")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 and "fps_mode" in done.stderr:  # ffmpeg before 5.1
        cmd = ffmpeg_command(ffmpeg, clip, frames, out, preset=preset, vsync_option="-vsync")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return cmd


# -- PyAV generator --------------------------------------------------------------------------------


class SyntheticFrames:
    """Moving synthetic frames in yuv420p layout ((H * 3 / 2, W) uint8), built cheaply into one buffer.

    Y: a sawtooth gradient (period 256 pixels, slanted) scrolling 8 pixels a frame, a bright box moving
    on a Lissajous path and, at the top left, the frame number in binary (20 blocks, white = 1).
    U and V: sawtooth gradients scrolling with Y (one motion vector). Every frame is a few slice copies.
    """

    PERIOD = 256
    BITS = 20

    def __init__(self, width: int, height: int) -> None:
        if width % 2 or height % 4:
            raise ValueError(f"need an even width and a height divisible by 4, got {width}x{height}")
        self.width, self.height = width, height
        h2, w2, p = height // 2, width // 2, self.PERIOD
        ramp = (16 + np.arange(p) * 219 // (p - 1)).astype(np.uint8)  # video range 16..235
        x = np.arange(width + p)
        y = np.arange(height)
        self.base_y = ramp[(x[None, :] + y[:, None] // 2) % p]
        xc = np.arange(w2 + p // 2)[None, :] % (p // 2)  # chroma: half the period, as it has half the width
        yc = np.arange(h2)[:, None]
        self.base_u = ramp[(2 * xc + yc) % p]
        self.base_v = ramp[(2 * ((xc + p // 6) % (p // 2)) + 2 * yc) % p]
        self.buffer = np.empty((height * 3 // 2, width), dtype=np.uint8)
        self.y = self.buffer[:height]
        self.u = self.buffer[height : height + height // 4].reshape(h2, w2)
        self.v = self.buffer[height + height // 4 :].reshape(h2, w2)
        self.block = max(8, (min(width, height) // 45) // 2 * 2)  # even, so chroma blocks align
        self.box = (min(width, height) // 6) // 2 * 2

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` (the same buffer every call: encode it before asking for the next)."""
        p, w, h = self.PERIOD, self.width, self.height
        off = (8 * i) % p
        np.copyto(self.y, self.base_y[:, off : off + w])
        np.copyto(self.u, self.base_u[:, off // 2 : off // 2 + w // 2])  # chroma moves with luma: one motion vector
        np.copyto(self.v, self.base_v[:, off // 2 : off // 2 + w // 2])
        s = self.box
        bx = int((w - s) * (0.5 + 0.5 * math.sin(i * 0.05))) // 2 * 2
        by = int((h - s) * (0.5 + 0.5 * math.sin(i * 0.031 + 1.0))) // 2 * 2
        self.y[by : by + s, bx : bx + s] = 235
        self.u[by // 2 : (by + s) // 2, bx // 2 : (bx + s) // 2] = 64
        self.v[by // 2 : (by + s) // 2, bx // 2 : (bx + s) // 2] = 200
        b = self.block
        for bit in range(self.BITS):
            self.y[:b, bit * b : (bit + 1) * b] = 235 if (i >> bit) & 1 else 16
        self.u[: b // 2, : self.BITS * b // 2] = 128
        self.v[: b // 2, : self.BITS * b // 2] = 128
        return self.buffer


def frame_times(clip: Clip, frames: int) -> Iterator[tuple[int, int]]:
    """(frame number, pts in 1/30 s) for every frame of the clip."""
    for i in range(frames):
        yield i, vfr_pts(i) if clip.vfr else i


def make_with_pyav(clip: Clip, frames: int, out: Path, preset: str) -> dict[str, Any]:
    """Encode ``clip`` with PyAV into ``out``; returns the settings used."""
    import av

    pattern = SyntheticFrames(clip.width, clip.height)
    options = pyav_codec_options(clip.encoder, preset)
    time_base = Fraction(1, FPS)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream(clip.encoder, rate=FPS, options=options)
        assert isinstance(stream, av.VideoStream)
        stream.width = clip.width
        stream.height = clip.height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        gop = gop_size(clip.encoder)
        if gop is not None:
            stream.codec_context.gop_size = gop
        if clip.encoder == "libx265" and out.suffix == ".mp4":
            stream.codec_tag = "hvc1"
        for i, pts in frame_times(clip, frames):
            frame = av.VideoFrame.from_ndarray(pattern.frame(i), format="yuv420p")
            frame.pts = pts
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return {"options": options, "gop_size": gop_size(clip.encoder)}


def pyav_encoders() -> set[str]:
    try:
        import av
    except ImportError:
        return set()
    names = set()
    for name in ("libx264", "libx265", "libvpx-vp9"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        names.add(name)
    return names


# -- main ------------------------------------------------------------------------------------------


def select(only: list[str] | None) -> list[Clip]:
    if not only:
        return list(CLIPS)
    by_name = {c.name: c for c in CLIPS} | {Path(c.name).stem: c for c in CLIPS}
    unknown = [n for n in only if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown clip(s): {', '.join(unknown)}; clips: {', '.join(c.name for c in CLIPS)}")
    return [c for c in CLIPS if c in {by_name[n] for n in only}]


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the clips (keep it out of git)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="make only these clips (name, with or without ext)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every duration by this (e.g. 0.05)")
    parser.add_argument("--overwrite", action="store_true", help="remake clips that already exist")
    parser.add_argument(
        "--preset", default="ultrafast", help="x264/x265 preset (ultrafast: no B-frames, CAVLC, no deblocking in x264)"
    )
    parser.add_argument(
        "--generator", choices=["auto", "ffmpeg", "pyav"], default="auto", help="auto: ffmpeg if on PATH, else PyAV"
    )
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error("--scale must be > 0")
    clips = select(args.only)

    ffmpeg = shutil.which("ffmpeg")
    generator = args.generator
    if generator == "auto":
        generator = "ffmpeg" if ffmpeg else "pyav"
    if generator == "ffmpeg" and not ffmpeg:
        parser.error("--generator ffmpeg: no ffmpeg on PATH")
    encoders = ffmpeg_encoders(ffmpeg) if generator == "ffmpeg" and ffmpeg else pyav_encoders()
    print(f"generator: {generator}" + (f" ({ffmpeg})" if generator == "ffmpeg" else ""), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(args.out)
    total = time.perf_counter()
    failed = 0
    for clip in clips:
        path = args.out / clip.name
        if path.exists() and not args.overwrite:
            print(f"{clip.name}: exists, skipped ({path.stat().st_size / 1e6:.1f} MB; --overwrite remakes it)")
            continue
        if clip.encoder not in encoders:
            print(f"{clip.name}: SKIPPED, no {clip.encoder} encoder in {generator}")
            continue
        frames = clip.num_frames(args.scale)
        tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
        start = time.perf_counter()
        try:
            if generator == "ffmpeg" and ffmpeg:
                cmd = make_with_ffmpeg(ffmpeg, clip, frames, tmp, args.preset)
                settings: dict[str, Any] = {"command": shlex.join(["ffmpeg", *cmd[1:-1], clip.name])}
            else:
                settings = make_with_pyav(clip, frames, tmp, args.preset)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            failed += 1
            print(f"{clip.name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        tmp.replace(path)
        took = time.perf_counter() - start
        size = path.stat().st_size
        print(
            f"{clip.name}: {frames} frames {clip.width}x{clip.height} {clip.encoder}"
            f"{' VFR' if clip.vfr else ''}, {size / 1e6:.1f} MB in {took:.1f} s ({frames / took:.0f} frames/s)",
            flush=True,
        )
        manifest[clip.name] = {
            **asdict(clip),
            "scale": args.scale,
            "frames": frames,
            "generator": generator,
            "settings": settings,
            "size_bytes": size,
            "seconds_to_make": round(took, 2),
            "date": time.strftime("%Y-%m-%d"),
        }
        (args.out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"done in {time.perf_counter() - total:.1f} s: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
