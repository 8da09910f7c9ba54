"""Reading 32 frames of a video: decord vs dycoke's exact and keyframe seeking vs a sequential decode.

Make the clips (see ``make_video_corpus.py``), then run every contender on every clip, side by side:

    python benchmarks/make_video_corpus.py --out .corpus
    python benchmarks/bench_video.py --corpus .corpus --out benchmarks/results/video-2core.json

Quick try (tiny clips, a minute or two):

    python benchmarks/make_video_corpus.py --out .corpus-quick --scale 0.05
    python benchmarks/bench_video.py --corpus .corpus-quick --repeats 1 --out .corpus-quick/results.json

The corpus folder is not committed: keep it outside the repository or in a folder ``.gitignore`` lists.

Contenders, for ``--frames F`` (default 32) frames spread uniformly over the clip:

- ``decord``: ``decord.VideoReader(path).get_batch(np.linspace(0, n - 1, F).astype(int))``, full size.
- ``exact``: ``read_video(path, num_frames=F, seek="exact", min_decode_side=None)`` (full size, like decord).
- ``exact-768``: ``read_video(path, num_frames=F, seek="exact")`` (the default reduced decoding size).
- ``exact-decord``: ``read_video(path, num_frames=F, seek="exact", min_decode_side=None, decoder="decord")``
  (decord's ``get_batch`` in parallel readers wherever decord seeks right: the default before PyAV).
- ``keyframe``: ``read_video(path, num_frames=F, seek="keyframe", min_decode_side=None)``.
- ``sequential``: a plain PyAV decode of the whole file (``container.decode(video=0)``, frame threads
  on), keeping the frames at the exact indices' display positions. Clips longer than
  ``--skip-sequential-over`` seconds skip it.

Display position ``i`` is the ``i``-th frame in presentation order (packet pts sorted ascending) of the
benchmark's own PyAV demux pass, which also gives the GOP facts: key frames, B-frames (pts out of decode
order), open GOP (a frame after a key frame in decode order but shown before it, e.g. HEVC RASL frames
after a CRA), variable frame rate.

Correctness: reference frames at every display position a contender returned come from the sequential
decode (clips up to ``--skip-sequential-over`` seconds) or else from a PyAV seek to a key frame before
each target and a decode forward to it (an earlier key frame is tried when the target is not reached,
e.g. a leading frame of an open GOP). Both are independent of dycoke's code. A contender's frame counts
as equal to the reference when the mean absolute difference over its pixels and channels is below 2.0
levels (decord and PyAV convert YUV to RGB slightly differently); ``wrong`` counts the others. The
reference also records how far apart consecutive frames are (``min_neighbour_diff``): when that is not
well above 2.0, a frame one position off would pass as equal, and the table says so.

Timing: the file is read once untimed (page cache warm), then ``--repeats`` rounds (default 3), each
running every contender once, in turn; the median is reported with every run. Each timing covers
opening the file to having the RGB frames in memory. Frames are compared in the first round only.

Writes ``--out FILE.json`` (environment, command line, per clip: GOP facts, each contender's runs,
median, ratio to decord, wrong frames, keyframe's ``max_shift_s`` and decode costs) and ``FILE.md`` (the
table, also printed). ``--without-seek`` calls ``read_video`` without ``seek=`` (a dycoke that predates
seek modes: ``exact`` and ``exact-768`` then measure its default reading, ``keyframe`` is skipped).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import gc
import inspect
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.make_video_corpus import CLIPS, MANIFEST

CONTENDERS = ["decord", "exact", "exact-768", "exact-decord", "keyframe", "sequential"]
EQUAL_BELOW = 2.0  # mean absolute difference (0..255 levels) under which two frames count as the same
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi"}


# -- the clip's own facts (PyAV demux pass) --------------------------------------------------------


@dataclass
class Probe:
    """What one PyAV demux pass says about a clip's video stream."""

    codec: str
    width: int
    height: int
    time_base: float
    avg_fps: float | None
    duration_s: float
    display_pts: list[int]  # every frame's pts, ascending: display position i has display_pts[i]
    key_pts: list[int]  # key frames' pts, ascending
    has_b_frames: bool
    open_gop: bool
    leading_frames: int  # frames decoded after a (non-first) key frame but shown before it
    gap_min_s: float
    gap_max_s: float
    position_of: dict[int, int] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.display_pts)

    @property
    def vfr(self) -> bool:
        """Frame gaps differ by more than 1% and more than timestamp rounding (webm's 1 ms ticks: 33/34 ms)."""
        return self.gap_max_s - self.gap_min_s > max(0.01 * self.gap_min_s, 1.5 * self.time_base)

    def key_positions(self) -> list[int]:
        return sorted(self.position_of[p] for p in self.key_pts)

    def summary(self) -> dict[str, Any]:
        keys = self.key_positions()
        gops = [b - a for a, b in zip(keys, [*keys[1:], self.num_frames], strict=True)]
        return {
            "codec": self.codec,
            "width": self.width,
            "height": self.height,
            "frames": self.num_frames,
            "duration_s": round(self.duration_s, 3),
            "avg_fps": None if self.avg_fps is None else round(self.avg_fps, 4),
            "vfr": self.vfr,
            "frame_gap_s": [round(self.gap_min_s, 5), round(self.gap_max_s, 5)],
            "key_frames": len(keys),
            "gop_frames": {"min": min(gops), "median": statistics.median(gops), "max": max(gops)} if gops else None,
            "b_frames": self.has_b_frames,
            "open_gop": self.open_gop,
            "leading_frames": self.leading_frames,
            "key_positions": keys[:50],
        }


def probe(path: Path) -> Probe:
    import av

    packets: list[tuple[int, bool]] = []  # (pts, key frame) in decode order
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        time_base = float(stream.time_base) if stream.time_base else 0.0
        for packet in container.demux(stream):
            ts = packet.pts if packet.pts is not None else packet.dts
            if packet.size == 0 or ts is None:
                continue
            packets.append((ts, bool(packet.is_keyframe)))
        codec = ctx.name
        width, height = ctx.width, ctx.height
        avg_fps = float(stream.average_rate) if stream.average_rate else None
        stream_duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
    if not packets:
        raise ValueError("no video packets")
    display = sorted(p[0] for p in packets)
    gaps = np.diff(display) * time_base if len(display) > 1 else np.array([0.0])
    duration = stream_duration or (display[-1] - display[0]) * time_base + float(np.median(gaps))
    key_pts = sorted(p[0] for p in packets if p[1])
    has_b = any(b[0] < a[0] for a, b in itertools.pairwise(packets))
    leading = 0
    key_seen = 0
    current_key: int | None = None
    for pts, key in packets:
        if key:
            key_seen += 1
            current_key = pts if key_seen > 1 else None
        elif current_key is not None and pts < current_key:
            leading += 1
    return Probe(
        codec=codec,
        width=width,
        height=height,
        time_base=time_base,
        avg_fps=avg_fps,
        duration_s=duration,
        display_pts=display,
        key_pts=key_pts,
        has_b_frames=has_b,
        open_gop=leading > 0,
        leading_frames=leading,
        gap_min_s=float(gaps.min()),
        gap_max_s=float(gaps.max()),
        position_of={pts: i for i, pts in enumerate(display)},
    )


# -- reference frames (PyAV, independent of dycoke) ------------------------------------------------


def _rgb(frame: Any) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


class Reference:
    """Reference RGB frames by display position, decoded with PyAV; filled on demand."""

    def __init__(self, path: Path, info: Probe) -> None:
        self.path = path
        self.info = info
        self.frames: dict[int, np.ndarray] = {}
        self.neighbour_diff: dict[int, float] = {}  # position -> mean abs diff to the next position
        self.method = ""
        self.seconds = 0.0
        self.seeks = 0
        self.frames_decoded = 0

    def sequential(self, positions: set[int]) -> None:
        """Decode the whole file once, keeping ``positions`` (and measuring each one's next frame)."""
        import av

        start = time.perf_counter()
        self.method = "sequential"
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                self.frames_decoded += 1
                q = self._position(frame)
                if q is None:
                    continue
                if q in positions or (q - 1 in positions and q - 1 in self.frames):
                    rgb = _rgb(frame)
                    if q - 1 in positions and q - 1 in self.frames:
                        self.neighbour_diff[q - 1] = mean_abs_diff(self.frames[q - 1], rgb)
                    if q in positions:
                        self.frames[q] = rgb
        self.seconds += time.perf_counter() - start

    def ensure(self, positions: set[int]) -> None:
        """Add the missing ``positions`` by seeking to a key frame before each and decoding forward."""
        missing = sorted(p for p in positions if p not in self.frames and 0 <= p < self.info.num_frames)
        if not missing:
            return
        import av

        start = time.perf_counter()
        self.method = self.method or "seek-forward"
        info = self.info
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded: Iterator[Any] | None = None
            last = -1  # display position of the last frame out of ``decoded``
            for p in missing:
                if p in self.frames:
                    continue
                key = max(0, bisect.bisect_right(info.key_pts, info.display_pts[p]) - 1)
                resume = decoded is not None and last < p and info.key_pts[key] <= info.display_pts[max(last, 0)]
                while True:
                    if not resume:
                        # to the pts: MP4 indexes by dts, which an edit list may shift (x265: -1024 ticks)
                        container.seek(info.key_pts[key], stream=stream, backward=True, any_frame=False)
                        self.seeks += 1
                        decoded = iter(container.decode(stream))
                        last = -1
                    resume = False
                    assert decoded is not None
                    last, found = self._forward(decoded, p, set(missing), last)
                    if found:
                        break
                    if key == 0:
                        raise RuntimeError(f"reference: display position {p} not reached from the first key frame")
                    key -= 1  # e.g. a leading frame of an open GOP, dropped when decoding starts at its key frame
        self.seconds += time.perf_counter() - start

    def _forward(self, decoded: Iterator[Any], p: int, wanted: set[int], last: int) -> tuple[int, bool]:
        """Decode on until position ``p`` and the frame after it; store wanted frames on the way."""
        for frame in decoded:
            self.frames_decoded += 1
            q = self._position(frame)
            if q is None:
                continue
            if q > p and p not in self.frames:
                return q, False
            if q in wanted or q == p + 1:
                rgb = _rgb(frame)
                if q - 1 in self.frames and q - 1 == last and q - 1 not in self.neighbour_diff:
                    self.neighbour_diff[q - 1] = mean_abs_diff(self.frames[q - 1], rgb)
                if q in wanted and q not in self.frames:
                    self.frames[q] = rgb
            last = q
            if q >= p + 1 or (q == p and p == self.info.num_frames - 1):
                return last, True
        return last, p in self.frames

    def _position(self, frame: Any) -> int | None:
        ts = frame.pts if frame.pts is not None else frame.dts
        return None if ts is None else self.info.position_of.get(ts)

    def compare(self, frames: np.ndarray, indices: list[int]) -> dict[str, Any]:
        """Mean absolute difference of each returned frame to the reference at its display position."""
        self.ensure(set(indices))
        diffs: list[float | None] = []
        for frame, index in zip(frames, indices, strict=True):
            ref = self.frames.get(index)
            if ref is None or ref.shape != frame.shape:
                diffs.append(None)
            else:
                diffs.append(round(mean_abs_diff(frame, ref), 3))
        known = [d for d in diffs if d is not None]
        return {
            "wrong_frames": sum(1 for d in diffs if d is None or d >= EQUAL_BELOW),
            "bit_exact_frames": sum(1 for d in diffs if d == 0.0),
            "uncomparable_frames": sum(1 for d in diffs if d is None),
            "max_mean_abs_diff": max(known) if known else None,
            "mean_abs_diff": diffs,
        }

    def summary(self) -> dict[str, Any]:
        diffs = list(self.neighbour_diff.values())
        return {
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "positions": len(self.frames),
            "frames_decoded": self.frames_decoded,
            "seeks": self.seeks,
            "min_neighbour_diff": round(min(diffs), 3) if diffs else None,
            "median_neighbour_diff": round(statistics.median(diffs), 3) if diffs else None,
        }


# -- contenders ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    frames: np.ndarray
    indices: list[int]
    extra: dict[str, Any]


def uniform(n: int, f: int) -> list[int]:
    return [int(i) for i in np.linspace(0, n - 1, f).astype(int)]


def run_decord(decord: Any, path: Path, f: int) -> Outcome:
    reader = decord.VideoReader(str(path))
    n = len(reader)
    indices = uniform(n, f)
    frames = reader.get_batch(indices).asnumpy()
    return Outcome(frames, indices, {"source_num_frames": n})


def run_sequential(path: Path, f: int, info: Probe) -> Outcome:
    import av

    positions = uniform(info.num_frames, f)
    wanted = set(positions)
    kept: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            ts = frame.pts if frame.pts is not None else frame.dts
            q = info.position_of.get(ts) if ts is not None else None
            if q in wanted:
                kept[q] = _rgb(frame)
    missing = [p for p in positions if p not in kept]
    if missing:
        raise RuntimeError(f"sequential decode gave no frame at display positions {missing[:5]}")
    return Outcome(np.stack([kept[p] for p in positions]), positions, {})


def import_decord() -> Any:
    try:
        import decord
    except Exception as exc:
        raise RuntimeError(f"cannot import decord: {type(exc).__name__}: {exc}") from exc
    return decord


def read_video_runner(name: str, f: int, without_seek: bool) -> Callable[[Path], Outcome]:
    """The call of ``dycoke.video.read_video`` for contender ``name``; raises RuntimeError when impossible."""
    try:
        from dycoke.video import read_video
    except Exception as exc:
        raise RuntimeError(f"cannot import dycoke.video.read_video: {type(exc).__name__}: {exc}") from exc
    has_seek = "seek" in inspect.signature(read_video).parameters
    kwargs: dict[str, Any] = {"num_frames": f}
    if name != "exact-768":
        kwargs["min_decode_side"] = None
    if name == "exact-decord":
        if "decoder" not in inspect.signature(read_video).parameters:
            raise RuntimeError("this dycoke's read_video() has no decoder= parameter (decord was its decoder)")
        kwargs["decoder"] = "decord"
    if has_seek and not without_seek:
        kwargs["seek"] = "keyframe" if name == "keyframe" else "exact"
    elif name == "keyframe":
        raise RuntimeError(
            "--without-seek: no keyframe mode" if has_seek else "this dycoke's read_video() has no seek= parameter"
        )
    elif not without_seek:
        raise RuntimeError(
            "this dycoke's read_video() has no seek= parameter (it predates seek modes; "
            "--without-seek measures its default reading)"
        )

    def run(path: Path) -> Outcome:
        video = read_video(path, **kwargs)
        extra: dict[str, Any] = {"call": f"read_video(path, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"}
        for attr in ("seek", "decoder", "max_shift_s", "decode_cost", "source_num_frames", "source_fps", "warnings"):
            if hasattr(video, attr):
                value = getattr(video, attr)
                extra[attr] = dict(value) if isinstance(value, dict) else value
        return Outcome(video.frames, [int(i) for i in video.indices], extra)

    return run


# -- one clip --------------------------------------------------------------------------------------


def warm_page_cache(path: Path) -> None:
    with path.open("rb") as fh:
        while fh.read(1 << 24):
            pass


def bench_clip(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    f = args.frames
    result: dict[str, Any] = {"clip": path.name, "size_bytes": path.stat().st_size}
    info = probe(path)
    result["info"] = info.summary()
    s = result["info"]
    print(
        f"\n== {path.name}: {s['codec']} {s['width']}x{s['height']}, {s['frames']} frames, {s['duration_s']:.1f} s, "
        f"{s['key_frames']} key frames, open GOP {'yes' if s['open_gop'] else 'no'}"
        f"{', B-frames' if s['b_frames'] else ''}{', VFR' if s['vfr'] else ''}",
        flush=True,
    )
    warm_page_cache(path)

    ref = Reference(path, info)
    exact_positions = set(uniform(info.num_frames, f))
    skip_sequential = info.duration_s > args.skip_sequential_over
    if skip_sequential:
        ref.ensure(exact_positions)
    else:
        ref.sequential(exact_positions)
    print(f"   reference: {ref.method}, {ref.seconds:.2f} s", flush=True)

    runners: dict[str, Callable[[Path], Outcome] | None] = {}
    state: dict[str, dict[str, Any]] = {}
    for name in args.contenders:
        state[name] = {"runs_s": [], "median_s": None, "error": None, "skipped": None}
        try:
            if name == "decord":
                runners[name] = functools.partial(run_decord, import_decord(), f=f)
            elif name == "sequential":
                if skip_sequential:
                    state[name]["skipped"] = f"video longer than {args.skip_sequential_over:g} s"
                    runners[name] = None
                else:
                    runners[name] = lambda p: run_sequential(p, f, info)
            else:
                runners[name] = read_video_runner(name, f, args.without_seek)
        except RuntimeError as exc:
            state[name]["error"] = str(exc)
            runners[name] = None

    for round_no in range(args.repeats):
        for name in args.contenders:
            runner = runners[name]
            st = state[name]
            if runner is None or st["error"]:
                continue
            gc.collect()
            start = time.perf_counter()
            try:
                out = runner(path)
            except Exception as exc:
                st["error"] = f"{type(exc).__name__}: {exc}"
                print(f"   {name:<11} ERROR {st['error']}", flush=True)
                continue
            took = time.perf_counter() - start
            st["runs_s"].append(round(took, 4))
            if round_no == 0:
                st["shape"] = list(out.frames.shape)
                st["indices"] = out.indices
                st.update(out.extra)
                if name != "exact-768":
                    try:
                        st.update(ref.compare(out.frames, out.indices))
                    except Exception as exc:  # the reference could not be decoded at these positions
                        st["compare_error"] = f"{type(exc).__name__}: {exc}"
            del out
            checked = round_no == 0 and "wrong_frames" in st
            print(f"   {name:<11} {took:8.3f} s" + (f"  wrong {st['wrong_frames']}" if checked else ""), flush=True)

    for st in state.values():
        if st["runs_s"]:
            st["median_s"] = round(statistics.median(st["runs_s"]), 4)
        if st.get("wrong_frames") is None:
            st.pop("wrong_frames", None)
    base = state.get("decord", {}).get("median_s")
    result["ratios_to_decord"] = {
        f"{name}/decord": round(st["median_s"] / base, 3) if base and st["median_s"] else None
        for name, st in state.items()
        if name != "decord"
    }
    result["reference"] = ref.summary()
    min_nd = result["reference"]["min_neighbour_diff"]
    if min_nd is not None and min_nd < 2 * EQUAL_BELOW:
        result["reference"]["note"] = (
            f"consecutive frames differ by as little as {min_nd} levels: a frame one position off may pass as equal"
        )
        print(f"   note: {result['reference']['note']}", flush=True)
    result["contenders"] = state
    return result


# -- output ----------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import av

    env: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "av": av.__version__,
        "av_ffmpeg": {k: ".".join(map(str, v)) for k, v in getattr(av, "library_versions", {}).items()},
    }
    try:
        import decord

        env["decord"] = decord.__version__
    except ImportError:
        env["decord"] = None
    try:
        import dycoke
        from dycoke.video import read_video

        env["dycoke"] = dycoke.__version__
        env["read_video_has_seek"] = "seek" in inspect.signature(read_video).parameters
    except Exception as exc:
        env["dycoke"] = f"not importable: {type(exc).__name__}: {exc}"
    env["git_commit"] = git_commit()
    return env


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _note(notes: list[str], text: str) -> int:
    """The footnote number of ``text`` (one number per distinct text)."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def _cell_time(st: dict[str, Any] | None, notes: list[str], name: str) -> str:
    if st is None:
        return ""
    if st.get("error"):
        text = f"{name}: {st['error']}"
        return f"error ({_note(notes, text)})"
    if st.get("skipped"):
        return "skipped"
    return f"{st['median_s']:.3f}" if st.get("median_s") is not None else ""


def _neighbour_cell(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" + (" !" if value < 2 * EQUAL_BELOW else "")


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    names = report["settings"]["contenders"]
    lines = [
        f"# Video reading: {report['settings']['frames']} frames per clip",
        "",
        f"`{env['command']}`",
        "",
        f"{env['date']}; {env['cpu_count']} CPUs ({env['cpu']}); decord {env['decord']}, av {env['av']}, "
        f"numpy {env['numpy']}, dycoke {env.get('dycoke')} (read_video seek=: {env.get('read_video_has_seek')}); "
        f"median of {report['settings']['repeats']} runs, seconds, page cache warm.",
        "",
    ]
    head = ["clip", "codec", "resolution", "MB", "duration s", "frames", "keys", "open GOP", *[f"{n} s" for n in names]]
    head += ["exact/decord", "keyframe/decord", "decord wrong", "exact wrong", "keyframe wrong", "keyframe max shift s"]
    head += ["next-frame diff"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for clip in report["clips"]:
        name = clip["clip"]
        if "error" in clip:
            lines.append(f"| {name} | error ({_note(notes, clip['error'])}) |" + " |" * (len(head) - 2))
            continue
        i = clip["info"]
        c = clip["contenders"]
        r = clip["ratios_to_decord"]

        def wrong(n: str, c: dict[str, Any] = c) -> str:
            st = c.get(n)
            if st and st.get("compare_error"):
                return f"not checked ({_note(notes, f'{n}: reference: ' + st['compare_error'])})"
            if not st or st.get("wrong_frames") is None:
                return ""
            return f"{st['wrong_frames']}/{len(st['indices'])}"

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return "" if r.get(key) is None else f"{r[key]:.2f}"

        shift = c.get("keyframe", {}).get("max_shift_s")
        row = [
            name,
            i["codec"],
            f"{i['width']}x{i['height']}",
            f"{clip['size_bytes'] / 1e6:.1f}",
            f"{i['duration_s']:.1f}",
            str(i["frames"]),
            str(i["key_frames"]),
            "yes" if i["open_gop"] else "no",
            *[_cell_time(c.get(n), notes, n) for n in names],
            ratio("exact/decord"),
            ratio("keyframe/decord"),
            wrong("decord"),
            wrong("exact"),
            wrong("keyframe"),
            "" if shift is None else f"{shift:.3f}",
            _neighbour_cell(clip["reference"].get("min_neighbour_diff")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"`wrong`: frames whose mean absolute difference to the reference frame at the same display position is "
        f">= {EQUAL_BELOW} levels (keyframe: at the positions it reports). Reference: PyAV, sequential decode or "
        "seek to a key frame and decode forward. `next-frame diff`: the smallest mean absolute difference between "
        f"a reference frame and the frame after it; `!` marks one under {2 * EQUAL_BELOW:g}, where a frame one "
        "position off could pass as equal.",
    ]
    if notes:
        lines += ["", *[f"({k}) {note}" for k, note in enumerate(notes, 1)]]
    return "\n".join(lines) + "\n"


def list_clips(args: argparse.Namespace) -> list[Path]:
    if args.clips:
        return [Path(p) for p in args.clips]
    folder = Path(args.corpus)
    if not folder.is_dir():
        raise SystemExit(f"--corpus {folder}: not a folder (make it with benchmarks/make_video_corpus.py)")
    order = {c.name: k for k, c in enumerate(CLIPS)}
    found = [p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")]
    found.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    if not found:
        raise SystemExit(f"--corpus {folder}: no video files")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="folder of clips (every video file in it)")
    src.add_argument("--clips", nargs="+", metavar="FILE", help="these video files")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is reported")
    parser.add_argument(
        "--skip-sequential-over",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="no sequential contender for clips longer than this; the reference then seeks and decodes forward",
    )
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--without-seek", action="store_true", help="call read_video without seek= (older dycoke)")
    parser.add_argument("--out", type=Path, help="results FILE.json (FILE.md is written next to it)")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.repeats < 1:
        parser.error("--frames and --repeats must be >= 1")

    clips = list_clips(args)
    report: dict[str, Any] = {
        "benchmark": "video reading",
        "environment": environment(),
        "settings": {
            "frames": args.frames,
            "repeats": args.repeats,
            "skip_sequential_over_s": args.skip_sequential_over,
            "contenders": args.contenders,
            "equal_below_mean_abs_diff": EQUAL_BELOW,
            "without_seek": args.without_seek,
        },
        "clips": [],
    }
    if args.corpus and (Path(args.corpus) / MANIFEST).is_file():
        with contextlib.suppress(ValueError):
            report["corpus"] = json.loads((Path(args.corpus) / MANIFEST).read_text())
    env = report["environment"]
    print(
        f"{env['cpu_count']} CPUs, decord {env['decord']}, av {env['av']}, numpy {env['numpy']}, "
        f"dycoke {env.get('dycoke')}, read_video seek=: {env.get('read_video_has_seek')}"
    )
    for path in clips:
        try:
            report["clips"].append(bench_clip(path, args))
        except Exception as exc:
            print(f"\n== {path.name}: ERROR {type(exc).__name__}: {exc}", flush=True)
            report["clips"].append({"clip": path.name, "error": f"{type(exc).__name__}: {exc}"})
        if args.out:
            write(report, args.out)
    table = markdown(report)
    print("\n" + table)
    if args.out:
        write(report, args.out)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
