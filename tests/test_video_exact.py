"""dycoke.video on every kind of stream: the frames returned are the frames asked for, in both seek modes.

Each clip's frames carry their own index as a bar code (``tests/videos.py``); the reference is a plain
sequential PyAV decode of the whole clip, frame i being the i-th frame out of the decoder (display
order). For every clip and mode the frames returned must read back as their reported index, equal the
reference's frames at those display positions (bar code and pixels), and in keyframe mode be key
frames where possible, never repeat, and report ``max_shift_s`` right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

from dycoke.errors import ConfigError
from dycoke.video import (
    MAX_DECODE_WORKERS,
    build_index,
    decode_size,
    decode_workers,
    demux_index,
    keyframe_targets,
    read_video,
    uniform_indices,
)
from dycoke.video.plan import _plan
from dycoke.video.readers import _read_pyav
from tests.videos import frame_number, has_encoder, numbered_frames, write_video

# variable frame rate: 40 frames 1, 2 or 3 ticks of 1/25 s apart (drawn once, fixed)
VFR_TICKS = np.concatenate([[0], np.cumsum(np.random.default_rng(7).integers(1, 4, 39))]).tolist()


@dataclass(frozen=True)
class Clip:
    """How a test clip is written and what reading it should involve."""

    file: str
    frames: int
    height: int
    width: int
    decoder: str  # with decoder="decord": "decord" where decord seeks right, "pyav" where not (open GOPs)
    open_gop: bool
    options: dict[str, object]
    needs: str = ""  # encoder that must be in this PyAV build
    num_frames: int = 8


CLIPS = {
    # x264 defaults: closed GOPs, 2 B-frames, key frame every 12 frames
    "h264_closed": Clip("h264.mp4", 48, 64, 96, "decord", False, {}),
    # x264 open GOPs: B-frames after each key frame (decoding order) are shown before it
    "h264_open": Clip("h264_open.mp4", 48, 64, 96, "pyav", True, {"open_gop": True}),
    # the same in Matroska, whose demuxer seeks by pts (MP4's and AVI's by dts)
    "h264_open_mkv": Clip("h264_open.mkv", 48, 64, 96, "pyav", True, {"open_gop": True}),
    # x265's default GOPs are open (CRA key frames with leading pictures)
    "hevc_open": Clip("hevc.mp4", 48, 64, 96, "pyav", True, {"codec": "libx265"}, needs="libx265"),
    "vp9": Clip("vp9.webm", 48, 64, 96, "decord", False, {"codec": "libvpx-vp9"}, needs="libvpx-vp9"),
    # MPEG-4 Part 2 with B-frames in AVI (Xvid-style): open GOPs, timestamps from the AVI index
    "mpeg4_avi": Clip("mpeg4.avi", 48, 64, 96, "pyav", True, {"codec": "mpeg4"}),
    "vfr": Clip("vfr.mkv", 40, 64, 96, "decord", False, {"pts": VFR_TICKS}),
    "portrait": Clip("portrait.mp4", 36, 128, 64, "decord", False, {"gop": 6}),
    # shorter side above 768: decoded reduced, by decord (closed) and by PyAV (open)
    "big": Clip("big.mp4", 12, 800, 1000, "decord", False, {"gop": 4}, num_frames=3),
    "big_open": Clip("big_open.mp4", 18, 1000, 800, "pyav", True, {"gop": 6, "open_gop": True}, num_frames=3),
}


@dataclass(frozen=True)
class Reference:
    """A sequential PyAV decode of a whole clip, in display order."""

    path: Path
    numbers: list[int]  # bar code read from frame i
    keys: list[int]  # positions of the frames the decoder flags as key frames
    seconds: list[float]  # frame i's own time from the first frame
    frames: np.ndarray  # (n, H, W, 3) at the size read_video decodes at (RGB, then bicubic, when reduced)


def _decode_all(path: Path) -> Reference:
    numbers, keys, pts, frames = [], [], [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        size = decode_size(stream.codec_context.height, stream.codec_context.width, 768)
        for i, frame in enumerate(container.decode(stream)):
            full = frame.to_ndarray(format="rgb24")
            numbers.append(frame_number(full))
            if frame.key_frame:
                keys.append(i)
            pts.append(frame.pts * frame.time_base)
            if size != full.shape[:2]:  # RGB first, then scaled
                rgb = frame.reformat(format="rgb24")
                full = rgb.reformat(width=size[1], height=size[0], interpolation="BICUBIC").to_ndarray()
            frames.append(full)
    return Reference(path, numbers, keys, [float(t - pts[0]) for t in pts], np.stack(frames))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    d = tmp_path_factory.mktemp("exact")
    out = {}
    for name, clip in CLIPS.items():
        if clip.needs and not has_encoder(clip.needs):
            continue
        path = write_video(d / clip.file, numbered_frames(clip.frames, clip.height, clip.width), 25, **clip.options)
        out[name] = _decode_all(path)
    return out


def _clip(clips: dict[str, Reference], name: str) -> Reference:
    if name not in clips:
        pytest.skip(f"this PyAV build has no {CLIPS[name].needs} encoder")
    return clips[name]


def _numbers(frames: np.ndarray) -> list[int]:
    return [frame_number(f) for f in frames]


def _nearest_key(index: int, keys: list[int]) -> int:
    return min(keys, key=lambda k: (abs(k - index), k))


@pytest.mark.parametrize("name", list(CLIPS))
def test_demux_index_knows_the_stream(clips: dict[str, Reference], name: str) -> None:
    ref = _clip(clips, name)
    index = demux_index(ref.path)
    clip = CLIPS[name]
    assert ref.numbers == list(range(clip.frames))  # the reference itself reads every frame back
    assert index.num_frames == clip.frames and index.ordered
    assert index.open_gop is clip.open_gop
    assert index.key_positions == ref.keys and len(ref.keys) >= 2
    assert index.seconds(range(clip.frames)).tolist() == pytest.approx(ref.seconds, abs=1e-3)


@pytest.mark.parametrize("decoder", ["auto", "decord"])
@pytest.mark.parametrize("mode", ["exact", "keyframe"])
@pytest.mark.parametrize("name", list(CLIPS))
def test_frames_are_the_frames_of_a_sequential_decode(
    clips: dict[str, Reference], name: str, mode: str, decoder: str
) -> None:
    ref = _clip(clips, name)
    clip = CLIPS[name]
    v = read_video(ref.path, num_frames=clip.num_frames, seek=mode, decoder=decoder)
    sampled = uniform_indices(clip.frames, clip.num_frames)
    assert v.decoder == (clip.decoder if decoder == "decord" else "pyav") and v.seek == mode
    assert v.frames.shape[1:3] == ref.frames.shape[1:3] == v.decoded_size
    assert _numbers(v.frames) == v.indices  # every frame is the one it says it is
    assert v.indices == sorted(set(v.indices)) and len(v.indices) == len(sampled)  # ascending, no repeats
    if v.decoded_size == v.source_size or v.decoder == "pyav":
        assert np.array_equal(v.frames, ref.frames[v.indices])
    else:  # decord's scale filter and PyAV's RGB-then-bicubic differ on the stripes' edges (0.29 / 11)
        diff = np.abs(v.frames.astype(int) - ref.frames[v.indices])
        assert diff.mean() < 0.5 and diff.max() <= 16, (diff.mean(), diff.max())
    times = (lambda i: ref.seconds[i]) if name == "vfr" else (lambda i: i / 25)
    assert v.timestamps_s == pytest.approx([times(i) for i in v.indices], abs=1e-3)
    shifts = [abs(times(r) - times(s)) for r, s in zip(v.indices, sampled, strict=True)]
    assert v.max_shift_s == pytest.approx(max(shifts), abs=1e-3)
    cost = v.decode_cost
    assert 0 < cost["keyframe_frames_decoded"] <= cost["exact_frames_decoded"] <= clip.frames
    if mode == "exact":
        assert v.indices == sampled and v.max_shift_s == 0.0
        return
    # keyframe: each sampled frame gives way to its nearest key frame, unless another sampled frame is
    # nearer to that key frame; so every distinct nearest key frame is returned exactly once
    nearest = {_nearest_key(s, ref.keys) for s in sampled}
    assert {i for i in v.indices if i in ref.keys} == nearest
    for returned, asked in zip(v.indices, sampled, strict=True):
        assert returned == asked or (returned in ref.keys and returned == _nearest_key(asked, ref.keys))


def test_keyframe_mode_takes_only_key_frames_when_they_are_dense(clips: dict[str, Reference]) -> None:
    ref = clips["portrait"]  # 36 frames, key frames 0, 6, ..., 30
    v = read_video(ref.path, num_frames=4, seek="keyframe")
    assert uniform_indices(36, 4) == [0, 11, 23, 35]
    assert v.indices == [0, 12, 24, 30] and _numbers(v.frames) == v.indices
    assert v.max_shift_s == pytest.approx(5 / 25)
    assert v.decode_cost["keyframe_frames_decoded"] == 4 and v.decode_cost["keyframe_seeks"] == 4


def test_decode_cost_counts_from_the_key_frames(tmp_path: Path) -> None:
    # no B-frames: decoding order is display order; key frames 0, 10, 20; samples 0, 9, 19, 29
    path = write_video(tmp_path / "ip.mp4", numbered_frames(30, 64, 96), 25, gop=10, bframes=0)
    exact = read_video(path, num_frames=4)
    key = read_video(path, num_frames=4, seek="keyframe")
    assert exact.indices == [0, 9, 19, 29] and _numbers(exact.frames) == exact.indices
    assert key.indices == [0, 10, 20, 29] and _numbers(key.frames) == key.indices
    assert key.max_shift_s == pytest.approx(1 / 25) and exact.max_shift_s == 0.0
    # exact: each sample ends its key frame's segment, so one forward pass decodes everything (30 frames);
    # keyframe: 0, 10 and 20 are one frame each, 29 is decoded on from 20 (10 frames)
    expected = {"exact_frames_decoded": 30, "keyframe_frames_decoded": 12, "exact_seeks": 1, "keyframe_seeks": 3}
    assert {k: exact.decode_cost[k] for k in expected} == expected
    assert {k: key.decode_cost[k] for k in expected} == expected


@pytest.mark.parametrize("workers", ["1", "3"])
def test_pyav_readers_on_threads_return_the_same_frames(
    clips: dict[str, Reference], monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    ref = clips["h264_open"]
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", workers)
    v = read_video(ref.path, num_frames=16)  # three forward runs: from key frames 0, 12 and 24
    assert v.decoder == "pyav" and v.decode_cost["exact_seeks"] == 3
    assert v.decode_cost["readers"] == 1 if workers == "1" else v.decode_cost["readers"] >= 2  # balanced by cost
    assert np.array_equal(v.frames, ref.frames[v.indices])


def test_pyav_reduced_size_is_close_to_decord(clips: dict[str, Reference]) -> None:
    ref = clips["big"]  # closed GOPs: read_video uses decord; the PyAV path decodes the same frames
    v = read_video(ref.path, num_frames=3)
    index = demux_index(ref.path)
    frames, readers = _read_pyav(str(ref.path), index, _plan(index, v.indices), v.decoded_size, 2)
    assert v.decoded_size == (768, 960) and frames.shape == v.frames.shape and readers == 2
    diff = np.abs(frames.astype(int) - v.frames)
    assert _numbers(frames) == v.indices and diff.mean() < 0.1 and diff.max() <= 16


def test_failed_seek_falls_back_to_reading_forward(
    clips: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dycoke.video.readers as video

    def fail(*args: object) -> None:
        raise video._SeekFailed("frame 13 did not come out of the decoder after seeking")

    monkeypatch.setattr(video, "_decode_runs", fail)
    ref = clips["h264_open"]
    v = read_video(ref.path, num_frames=6, seek="keyframe")
    assert v.decoder == "sequential" and _numbers(v.frames) == v.indices
    assert v.indices == keyframe_targets(uniform_indices(48, 6), ref.keys)
    assert v.warnings == [
        "seeking by timestamp failed (frame 13 did not come out of the decoder after seeking): "
        "decoded forward from the start instead"
    ]


def test_window_bounds_the_key_frames(clips: dict[str, Reference]) -> None:
    ref = clips["h264_closed"]  # 25 fps, key frames 0, 12, 24, 36
    v = read_video(ref.path, num_frames=3, start_s=0.5, end_s=1.4, seek="keyframe")  # frames 12..34
    assert uniform_indices(48, 3, 12, 34) == [12, 23, 34]
    assert v.indices == [12, 24, 34] and _numbers(v.frames) == v.indices  # 34's nearest key (36) is outside


def test_bad_seek_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        read_video(tmp_path / "missing.mp4", seek="nearest")
    assert str(exc.value) == "seek must be one of exact, keyframe, got 'nearest'"


# -- pure parts ------------------------------------------------------------------------------------


def test_build_index_from_packets() -> None:
    # decoding order I0 P3 B1 B2 | I6 B4 B5 P9 B7 B8: B4 and B5 follow key frame 6 but are shown before it
    pts = [0, 3, 1, 2, 6, 4, 5, 9, 7, 8]
    keys = [True, False, False, False, True, False, False, False, False, False]
    index = build_index(pts, [None] * 10, keys, [1] * 10)
    assert index.pts.tolist() == list(range(10)) and index.key_positions == [0, 6]
    assert index.decode_position.tolist() == [0, 2, 3, 1, 5, 6, 4, 8, 9, 7]
    assert index.open_gop and index.ordered and index.end_pts == 10
    closed = build_index([0, 3, 1, 2, 4, 7, 5, 6], [None] * 8, [True, False, False, False, True, False, False, False])
    assert not closed.open_gop and closed.key_positions == [0, 4]
    # a codec that may reorder, but packets claiming to be in order: the timestamps are not trusted
    assert not build_index([0, 1, 2, 3], [0, 1, 2, 3], [True] + [False] * 3, reorders=True).ordered
    assert build_index([0, 1, 2, 3], [0, 1, 2, 3], [True] + [False] * 3).ordered
    assert not build_index([0, None, 2], [0, 1, 2], [True, False, False]).ordered
    assert not build_index([0, 1, 1], [0, 1, 2], [True, False, False]).ordered


def test_keyframe_targets_rules() -> None:
    keys = [0, 10, 20, 30]
    assert keyframe_targets([1, 12, 29], keys) == [0, 10, 30]
    assert keyframe_targets([5, 15], keys) == [0, 10]  # a tie goes to the earlier key frame
    assert keyframe_targets([8, 11, 13], keys) == [8, 10, 13]  # 11 is nearest to 10: 8 and 13 stay exact
    assert keyframe_targets([9, 11], keys) == [10, 11]  # equally near: the earlier sample takes it
    assert keyframe_targets([10, 12], keys) == [10, 12]
    assert keyframe_targets([21, 29], keys, last=29) == [20, 29]  # 30 is outside the window
    assert keyframe_targets([3, 6], [], last=6) == [3, 6]
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 200))
        keys = sorted({0, *rng.integers(0, n, int(rng.integers(1, 12))).tolist()})
        sampled = sorted(set(rng.integers(0, n, int(rng.integers(1, 40))).tolist()))
        got = keyframe_targets(sampled, keys, 0, n - 1)
        assert got == sorted(set(got)) and len(got) == len(sampled)
        assert all(g == s or g in keys for g, s in zip(got, sampled, strict=True))
        assert {g for g in got if g in keys} == {_nearest_key(s, keys) for s in sampled}


def test_decode_workers_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.delenv("DYCOKE_DECODE_WORKERS", raising=False)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    assert decode_workers() == min(cpus, MAX_DECODE_WORKERS)
    assert decode_workers(1) == 1
    assert decode_workers(8, work=399) == 1  # too little work for a second reader
    assert decode_workers(8, work=100_000) == min(cpus, MAX_DECODE_WORKERS, 8)
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", "5")
    assert decode_workers(8, work=10) == 5  # the override wins
    assert decode_workers() == 5 and decode_workers(3) == 3
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", "zero")
    assert decode_workers() == min(cpus, MAX_DECODE_WORKERS)


def test_decode_workers_for_seeking_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    # PyAV readers (seeking): one per 25 frames of work (a seek counting 5), up to one per CPU, beyond
    # decord's cap
    monkeypatch.delenv("DYCOKE_DECODE_WORKERS", raising=False)
    monkeypatch.setattr("dycoke.video.plan._cpu_count", lambda: 16)
    assert decode_workers(22, work=3566, seeking=True) == 16
    assert decode_workers(32, work=32, seeking=True) == 7  # 32 key frames alone: (32 + 32 * 5) // 25
    assert decode_workers(3, work=600, seeking=True) == 3 and decode_workers(2, work=10, seeking=True) == 1
    assert decode_workers(22, work=3566) == MAX_DECODE_WORKERS == 8
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", "5")
    assert decode_workers(22, work=3566, seeking=True) == 5


def test_the_frame_store_fills_every_slot_of_a_position_and_refuses_a_wrong_size() -> None:
    from dycoke.errors import VideoError
    from dycoke.video.readers import FrameStore

    store = FrameStore("clip.mp4", [4, 9, 9, 12], (2, 3))
    for position in (12, 9, 4):  # in any order, as the readers' threads finish
        store.put(position, np.full((2, 3, 3), position, dtype=np.uint8))
    assert store.frames.shape == (4, 2, 3, 3) and store.frames[:, 0, 0, 0].tolist() == [4, 9, 9, 12]
    with pytest.raises(VideoError, match=r"clip.mp4: decoder returned a frame of shape \(3, 3, 3\), expected"):
        store.put(4, np.zeros((3, 3, 3), dtype=np.uint8))
