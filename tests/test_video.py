"""dycoke.video: which frames are picked, and that decoding returns exactly those frames.

Synthetic videos (tests/videos.py) carry their frame index as a bar code, so every decoded frame
can be checked against the index it was asked for.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from dycoke.errors import ConfigError, DyCokeError, VideoError
from dycoke.video import (
    DEFAULT_MIN_DECODE_SIDE,
    decode_size,
    fps_indices,
    frame_window,
    read_video,
    uniform_indices,
)
from dycoke.video.native import _decord_errors, _native_stderr
from tests.videos import frame_number, numbered_frames, textured_frames, write_numbered_video, write_video

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

# numpy.linspace(0, 99, 32, dtype=int), written out: the paper's rule for 100 frames, F = 32.
LINSPACE_100_32 = [
    0, 3, 6, 9, 12, 15, 19, 22, 25, 28, 31, 35, 38, 41, 44, 47,
    51, 54, 57, 60, 63, 67, 70, 73, 76, 79, 83, 86, 89, 92, 95, 99,
]  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small numbered videos shared by the tests of this module."""
    d = tmp_path_factory.mktemp("videos")
    return {
        # x264, closed GOP: key frame every 12 frames, 2 B-frames
        "x264": write_numbered_video(d / "x264.mp4", 100, 25),
        # MPEG-4 Part 2 with B-frames: open GOP, decord's seeking lands off by up to 2 frames
        "mpeg4_bframes": write_numbered_video(d / "mpeg4.mp4", 100, 25, codec="mpeg4"),
        "short": write_numbered_video(d / "short.mp4", 10, 25),
        "ntsc": write_numbered_video(d / "ntsc.mkv", 300, Fraction(30000, 1001)),
        "pal_half": write_numbered_video(d / "half.mp4", 125, 12.5),
        "long": write_numbered_video(d / "long.mp4", 1500, 25, height=32, width=64),
    }


def numbers(frames: np.ndarray) -> list[int]:
    return [frame_number(f) for f in frames]


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# -- pure index sampling ---------------------------------------------------------------------------


def test_uniform_indices_is_the_paper_linspace_truncation() -> None:
    got = uniform_indices(100, 32)
    assert got == LINSPACE_100_32
    assert got == [math.floor(k * 99 / 31) for k in range(32)]  # truncation, not rounding (31*99/31 = 99)
    assert got == np.linspace(0, 99, 32, dtype=int).tolist()
    assert uniform_indices(1000, 8) == [0, 142, 285, 428, 570, 713, 856, 999]
    assert uniform_indices(5, 1) == [0]


def test_uniform_indices_fewer_frames_than_requested_returns_all() -> None:
    assert uniform_indices(10, 32) == list(range(10))
    assert uniform_indices(32, 32) == list(range(32))
    assert uniform_indices(100, 32, first=40, last=49) == list(range(40, 50))


def test_uniform_indices_over_a_range() -> None:
    assert uniform_indices(1000, 4, first=100, last=400) == [100, 200, 300, 400]
    assert uniform_indices(1000, 3, first=10, last=20) == [10, 15, 20]


@pytest.mark.parametrize("bad", [0, -3])
def test_uniform_indices_rejects_bad_count(bad: int) -> None:
    with pytest.raises(ConfigError) as exc:
        uniform_indices(100, bad)
    assert f"got {bad}" in one_line(exc) and "num_frames" in str(exc.value) and ">= 1" in str(exc.value)


def test_uniform_indices_rejects_range_outside_video() -> None:
    with pytest.raises(ConfigError, match=r"frame range 90\.\.100 .* 0\.\.99"):
        uniform_indices(100, 4, first=90, last=100)


def test_frame_window_semantics() -> None:
    # 10 s at 25 fps: frames shown during [2 s, 4 s) are 50..99
    assert frame_window(250, 25.0, 2.0, 4.0) == (50, 99)
    assert frame_window(250, 25.0) == (0, 249)
    assert frame_window(250, 25.0, start_s=9.99) == (249, 249)
    assert frame_window(250, 25.0, end_s=100.0) == (0, 249)  # clipped to the end
    # a window inside one frame still gives that frame
    assert frame_window(250, 25.0, 1.01, 1.02) == (25, 25)
    # float error is snapped: 0.7 s * 10 fps is frame 7 exactly, 0.29 s * 100 fps is 29
    assert frame_window(100, 10.0, 0.3, 0.7) == (3, 6)
    assert frame_window(1000, 100.0, 0.29, 0.5) == (29, 49)
    # NTSC: frame 29 is shown during [0.9676, 1.0010) s, so it is the one at 1.0 s
    assert frame_window(300, 30000 / 1001, 1.0, 2.0) == (29, 59)


def test_frame_window_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        frame_window(250, 25.0, start_s=-1.0)
    assert "start" in one_line(exc) and "-1.0" in str(exc.value) and ">= 0" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        frame_window(250, 25.0, start_s=3.0, end_s=2.0)
    assert "end" in one_line(exc) and "2.0" in str(exc.value) and "greater than start (3 s)" in str(exc.value)
    with pytest.raises(ConfigError):
        frame_window(250, 25.0, start_s=3.0, end_s=3.0)
    with pytest.raises(ConfigError):
        frame_window(250, 25.0, start_s=float("nan"))
    with pytest.raises(VideoError) as exc:
        frame_window(250, 25.0, start_s=10.0)
    assert "start 10 s" in one_line(exc) and "duration 10.000 s" in str(exc.value)


def test_fps_indices_samples_video_time() -> None:
    # 10 s at 25 fps, 1 frame per second: one every 25 frames
    assert fps_indices(250, 25.0, 1.0, 64) == list(range(0, 250, 25))
    # window [2, 4) s at 2 fps: t = 2, 2.5, 3, 3.5 -> frames 50, 62, 75, 87
    assert fps_indices(250, 25.0, 2.0, 64, start_s=2.0, end_s=4.0) == [50, 62, 75, 87]
    # NTSC 29.97 fps, 1 fps: floor(k * 29.97); 300 frames last 10.01 s, so t = 10 s (frame 299) is in
    assert fps_indices(300, 30000 / 1001, 1.0, 64) == [0, 29, 59, 89, 119, 149, 179, 209, 239, 269, 299]
    # 12.5 fps source at 2 fps: t = 0, 0.5, 1, ... -> floor(12.5 t)
    assert fps_indices(125, 12.5, 2.0, 64) == [
        0,
        6,
        12,
        18,
        25,
        31,
        37,
        43,
        50,
        56,
        62,
        68,
        75,
        81,
        87,
        93,
        100,
        106,
        112,
        118,
    ]


def test_fps_indices_never_repeats_a_frame() -> None:
    assert fps_indices(20, 10.0, 25.0, 64) == list(range(20))  # above the source rate: every frame once


def test_fps_indices_caps_with_uniform_spread_over_the_window() -> None:
    # 60 s at 25 fps sampled at 2 fps would be 120 frames; cap 16 -> 16 spread over the whole video
    assert fps_indices(1500, 25.0, 2.0, 16) == uniform_indices(1500, 16)
    assert fps_indices(1500, 25.0, 2.0, 16, start_s=10.0, end_s=30.0) == uniform_indices(1500, 16, 250, 749)
    # exactly at the cap: no fallback
    assert fps_indices(250, 25.0, 1.0, 10) == list(range(0, 250, 25))


@pytest.mark.parametrize(("fps", "max_frames", "name"), [(0.0, 8, "fps"), (-1.0, 8, "fps"), (1.0, 0, "max_frames")])
def test_fps_indices_rejects_bad_values(fps: float, max_frames: int, name: str) -> None:
    with pytest.raises(ConfigError) as exc:
        fps_indices(250, 25.0, fps, max_frames)
    assert one_line(exc).startswith(name)


def test_decode_size_policy() -> None:
    assert decode_size(2160, 3840, 768) == (768, 1366)
    assert decode_size(4320, 7680, 768) == (768, 1366)
    assert decode_size(1080, 1920, 768) == (768, 1366)
    assert decode_size(3840, 2160, 768) == (1366, 768)  # portrait
    assert decode_size(1081, 1921, 768) == (768, 1364)  # even dimensions
    assert decode_size(2160, 3840, 767) == (768, 1366)  # odd minimum rounded up to even
    assert decode_size(720, 1280, 768) == (720, 1280)  # never upscaled
    assert decode_size(769, 1000, 768) == (768, 998)  # any larger shorter side is reduced
    assert decode_size(2160, 3840, None) == (2160, 3840)
    assert DEFAULT_MIN_DECODE_SIDE == 768


# -- reading: the frames decoded are the ones asked for --------------------------------------------


def test_read_video_uniform_frames_are_exact(videos: dict[str, Path]) -> None:
    v = read_video(videos["x264"], num_frames=32)
    assert v.indices == LINSPACE_100_32
    assert numbers(v.frames) == v.indices
    assert v.frames.shape == (32, 64, 96, 3) and v.frames.dtype == np.uint8
    assert v.num_frames == 32
    assert v.source_num_frames == 100 and v.source_fps == 25.0 and v.duration_s == 4.0
    assert v.timestamps_s == [i / 25 for i in v.indices]
    assert v.source_size == v.decoded_size == (64, 96)
    assert v.warnings == []


def test_read_video_every_frame_and_random_order_windows(videos: dict[str, Path]) -> None:
    v = read_video(videos["x264"], num_frames=100)
    assert numbers(v.frames) == list(range(100))
    v = read_video(videos["long"], num_frames=7, start_s=33.3, end_s=47.1)
    assert v.indices == uniform_indices(1500, 7, 832, 1177) and numbers(v.frames) == v.indices


def test_read_video_open_gop_is_read_by_timestamp(videos: dict[str, Path]) -> None:
    # decord's seeking is wrong here (open GOPs): PyAV seeks by timestamp instead, no warning needed
    v = read_video(videos["mpeg4_bframes"], num_frames=16)
    assert numbers(v.frames) == v.indices == uniform_indices(100, 16)
    assert v.decoder == "pyav" and v.warnings == []


def test_read_video_short_video_gives_all_frames_and_a_warning(videos: dict[str, Path]) -> None:
    v = read_video(videos["short"], num_frames=32)
    assert v.indices == list(range(10)) and numbers(v.frames) == v.indices
    assert v.warnings == ["video has 10 frames, fewer than the 32 requested: using all 10"]


def test_read_video_ntsc_frame_rate(videos: dict[str, Path]) -> None:
    v = read_video(videos["ntsc"], num_frames=8)
    assert v.source_fps == pytest.approx(30000 / 1001, rel=1e-9)
    assert v.duration_s == pytest.approx(300 * 1001 / 30000, rel=1e-9)  # 10.01 s
    assert v.indices == uniform_indices(300, 8) and numbers(v.frames) == v.indices
    assert v.timestamps_s == pytest.approx([i * 1001 / 30000 for i in v.indices], rel=1e-9)
    v = read_video(videos["ntsc"], fps=1.0)
    assert v.indices == [0, 29, 59, 89, 119, 149, 179, 209, 239, 269, 299] and numbers(v.frames) == v.indices
    assert v.timestamps_s[1] == pytest.approx(0.9676, abs=1e-4)


def test_read_video_12_5_fps(videos: dict[str, Path]) -> None:
    v = read_video(videos["pal_half"], fps=2.0, start_s=2.0, end_s=4.0)
    assert v.source_fps == 12.5 and v.duration_s == 10.0
    assert v.indices == [25, 31, 37, 43] and numbers(v.frames) == v.indices
    assert v.timestamps_s == [2.0, 2.48, 2.96, 3.44]


def test_read_video_fps_cap_warns(videos: dict[str, Path]) -> None:
    v = read_video(videos["long"], fps=2.0, max_frames=16)  # 60 s * 2 fps = 120 > 16
    assert v.indices == uniform_indices(1500, 16) and numbers(v.frames) == v.indices
    assert v.warnings == ["2 fps gives 120 frames, more than max_frames=16: using 16 frames spread over the video"]


def test_read_video_window_past_the_end(videos: dict[str, Path]) -> None:
    v = read_video(videos["x264"], num_frames=4, start_s=3.0, end_s=9.0)
    assert v.indices == [75, 83, 91, 99] and numbers(v.frames) == v.indices
    assert v.warnings == ["end 9 s is past the end of the video (4.000 s): using up to the end"]
    with pytest.raises(VideoError) as exc:
        read_video(videos["x264"], start_s=4.0)
    assert one_line(exc) == "start 4 s is not before the end of the video (duration 4.000 s)"


def test_read_video_window_fewer_frames_warns(videos: dict[str, Path]) -> None:
    v = read_video(videos["x264"], num_frames=32, start_s=1.0, end_s=1.2)
    assert v.indices == [25, 26, 27, 28, 29] and numbers(v.frames) == v.indices
    assert v.warnings == ["window has 5 frames, fewer than the 32 requested: using all 5"]


def test_read_video_warns_on_variable_frame_rate(tmp_path: Path) -> None:
    # declared 10 fps, frames actually every 0.5 s: decord reports 10 fps, so n / fps = 2 s, not 10 s
    path = write_video(tmp_path / "vfr.mkv", numbered_frames(20, 64, 96), 10, pts_step=5)
    v = read_video(path, num_frames=4)
    assert v.source_fps == 10.0 and v.duration_s == 2.0
    assert v.indices == [0, 6, 12, 19] and numbers(v.frames) == v.indices
    assert len(v.warnings) == 1
    assert v.warnings[0].startswith("variable frame rate: the frames' own timestamps end at 9.")
    # a constant-rate file does not warn (checked throughout this module: warnings == [])


# -- reduced-size decoding -------------------------------------------------------------------------


def _resize_384(frames: np.ndarray) -> np.ndarray:
    """What the model does to every frame: bicubic + antialias to 384x384, rounded to uint8 levels."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(384, 384), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).numpy()


def test_reduced_decode_size_and_pixel_effect(tmp_path: Path) -> None:
    # Worst-case content (pixel noise, 1-px stripes), after the model's 384x384 resize, against the
    # frame decoded at full size: measured max 4, mean 0.20 at the default 768 (PyAV: RGB, then
    # scaled); decord's scale filter max 17, mean 1.61.
    path = write_video(tmp_path / "hd.mp4", textured_frames(1, 1080, 1920), 25, crf=12)
    full = read_video(path, num_frames=1, min_decode_side=None)
    reduced = read_video(path, num_frames=1)
    assert full.decoded_size == full.source_size == (1080, 1920) and full.frames.shape == (1, 1080, 1920, 3)
    assert reduced.source_size == (1080, 1920) and reduced.decoder == "pyav"
    assert reduced.decoded_size == (768, 1366) and reduced.frames.shape == (1, 768, 1366, 3)
    diff = np.abs(_resize_384(full.frames) - _resize_384(reduced.frames))
    assert diff.max() <= 8 and diff.mean() <= 0.4, (diff.max(), diff.mean())
    by_decord = read_video(path, num_frames=1, decoder="decord")
    assert by_decord.decoder == "decord" and by_decord.decoded_size == (768, 1366)
    decord_diff = np.abs(_resize_384(full.frames) - _resize_384(by_decord.frames))
    assert decord_diff.max() <= 24 and decord_diff.mean() <= 2.0, (decord_diff.max(), decord_diff.mean())
    # and a smaller minimum moves the pixels more (measured mean 0.66 at 384; decord's 4.3)
    small = read_video(path, num_frames=1, min_decode_side=384)
    assert small.decoded_size == (384, 682)
    assert np.abs(_resize_384(full.frames) - _resize_384(small.frames)).mean() > 2 * diff.mean()


def test_reduced_decode_keeps_the_right_frames(tmp_path: Path) -> None:
    path = write_video(tmp_path / "n.mp4", numbered_frames(60, 240, 432), 25)
    v = read_video(path, num_frames=9, min_decode_side=120)
    assert v.source_size == (240, 432) and v.decoded_size == (120, 216)
    assert v.indices == uniform_indices(60, 9) and numbers(v.frames) == v.indices


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_decoder_is_refused(tmp_path: Path) -> None:
    path = write_video(tmp_path / "n.mp4", numbered_frames(8, 64, 96), 25)
    with pytest.raises(ConfigError) as exc:
        read_video(path, decoder="opencv")
    assert one_line(exc) == "decoder must be one of auto, pyav, decord, got 'opencv'"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError) as exc:
        read_video(path)
    assert one_line(exc) == f"video not found: {path}"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(VideoError) as exc:
        read_video(tmp_path)
    assert one_line(exc) == f"video path is a directory, not a file: {tmp_path}"


def _write_zero_frame_video(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4" if path.suffix == ".avi" else "libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return path


@pytest.mark.parametrize(
    "kind", ["text", "garbage", "truncated", "header_only", "zero_frames", "zero_frames_avi", "empty"]
)
def test_unreadable_files(
    tmp_path: Path, videos: dict[str, Path], kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    data = videos["x264"].read_bytes()
    path = tmp_path / {"text": "notes.txt", "zero_frames_avi": "zero.avi"}.get(kind, f"{kind}.mp4")
    if kind == "text":
        path.write_text("This is not a video.\n" * 50)
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_only":
        path.write_bytes(data[:48])
    elif kind.startswith("zero_frames"):
        _write_zero_frame_video(path)
    else:
        path.write_bytes(b"")
    with pytest.raises(VideoError) as exc:
        read_video(path)
    message = one_line(exc)
    assert message.startswith(f"cannot read video {path}: ")
    assert "Traceback" not in message and "video_reader.cc" not in message
    expected = {
        "text": "no frame could be decoded (not a video file?)",
        "zero_frames": "it has no video stream (or no frames)",
        "zero_frames_avi": "the video stream has no decodable frames",
    }
    if kind in expected:
        assert message == f"cannot read video {path}: {expected[kind]}"
    # decord's C++ log ("[..] .../video_reader.cc:83: ERROR opening: ...") goes to fd 2 directly: caught there
    assert capfd.readouterr().err == ""


def test_truncated_faststart_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Header (moov) intact, frame data cut: decord fails while indexing packets."""
    src = tmp_path / "fs.mp4"
    with av.open(str(src), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for image in numbered_frames(50, 64, 96):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoError) as exc:
        read_video(cut)
    assert one_line(exc).startswith(f"cannot read video {cut}: ")
    assert capfd.readouterr().err == ""


OPEN_LOG = b"[19:07:26] /github/workspace/src/video/video_reader.cc:83: ERROR opening: %s, %s\n"


def _fd2_identity() -> tuple[int, int]:
    st = os.fstat(2)
    return st.st_dev, st.st_ino


def test_native_stderr_keeps_decord_log_and_passes_other_text_on(capfd: pytest.CaptureFixture[str]) -> None:
    before = _fd2_identity()
    messages: list[str] = []
    with _native_stderr(messages):
        assert _fd2_identity() != before
        os.write(2, b"\rspinner frame ")  # another thread's text without a newline, then decord's line
        os.write(2, OPEN_LOG % (b"/v/x.mp4", b"Invalid data found when processing input"))
        os.write(2, b"[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d2c8a3b2c0] moov atom not found\n")
        sys.stderr.write("python text\n")
    assert _fd2_identity() == before
    assert messages == ["ERROR opening: /v/x.mp4, Invalid data found when processing input"]
    err = capfd.readouterr().err  # (pytest captures sys.stderr apart from fd 2: order is not kept)
    assert "python text\n" in err and err.replace("python text\n", "") == "\rspinner frame "


def test_native_stderr_restores_fd2_when_the_block_raises(capfd: pytest.CaptureFixture[str]) -> None:
    before = _fd2_identity()
    messages: list[str] = []
    with pytest.raises(RuntimeError), _native_stderr(messages):
        os.write(2, b"[19:07:26] /src/video/video_reader.cc:312: Failed to seek file to position: 0\n")
        raise RuntimeError("boom")
    assert _fd2_identity() == before and messages == ["Failed to seek file to position: 0"]
    assert capfd.readouterr().err == ""


def test_native_stderr_threads_take_turns(capfd: pytest.CaptureFixture[str]) -> None:
    results: dict[int, list[str]] = {}

    def work(n: int) -> None:
        messages: list[str] = []
        with _native_stderr(messages):
            for _ in range(20):
                os.write(2, b"[19:07:26] /src/x.cc:1: thread %d\n" % n)
        results[n] = messages

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: [f"thread {n}"] * 20 for n in range(4)}
    assert capfd.readouterr().err == ""


def test_decord_errors_uses_the_captured_log(capfd: pytest.CaptureFixture[str]) -> None:
    warnings: list[str] = []
    with _decord_errors("/v/x.mp4", warnings):
        os.write(2, b"[19:07:26] /src/video/video_reader.cc:312: Failed to seek file to position: 0\n")
    assert warnings == ["decoder: Failed to seek file to position: 0"]
    with pytest.raises(VideoError) as exc, _decord_errors("/v/x.mp4"):
        os.write(2, OPEN_LOG % (b"/v/x.mp4", b"Invalid data found when processing input"))
        raise RuntimeError("Error reading /v/x.mp4...")
    assert one_line(exc) == "cannot read video /v/x.mp4: not a video file, or damaged/truncated"
    with pytest.raises(VideoError) as exc, _decord_errors("/v/x.mp4"):
        os.write(2, OPEN_LOG % (b"/v/x.mp4", b"Permission denied"))
        raise RuntimeError("Error reading /v/x.mp4...")
    assert one_line(exc) == "cannot read video /v/x.mp4: Permission denied"
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_frames": 0}, "num_frames must be an integer >= 1, got 0"),
        ({"num_frames": -2}, "num_frames must be an integer >= 1, got -2"),
        ({"max_frames": 0}, "max_frames must be an integer >= 1, got 0"),
        ({"fps": 0.0}, "fps must be a finite number > 0, got 0.0"),
        ({"fps": -1.5}, "fps must be a finite number > 0, got -1.5"),
        ({"fps": float("inf")}, "fps must be a finite number > 0, got inf"),
        ({"start_s": -1.0}, "start must be a number of seconds >= 0, got -1.0"),
        ({"start_s": 2.0, "end_s": 1.0}, "end must be a number of seconds greater than start (2 s), got 1.0"),
        ({"min_decode_side": 0}, "min_decode_side must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_config_errors(tmp_path: Path, kwargs: dict[str, float], needle: str) -> None:
    # checked before the file is even opened: a missing file does not mask them
    with pytest.raises(ConfigError) as exc:
        read_video(tmp_path / "missing.mp4", **kwargs)  # type: ignore[arg-type]
    assert one_line(exc) == needle
    assert isinstance(exc.value, DyCokeError)


# -- real clips ------------------------------------------------------------------------------------


def _pyav_frames(path: Path, indices: list[int]) -> np.ndarray:
    """Frames ``indices`` (ascending) decoded by PyAV (FFmpeg 7) reading front to back: (F, H, W, 3)."""
    wanted = set(indices)
    out = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out[i] = frame.to_ndarray(format="rgb24")
            if i >= indices[-1]:
                break
    return np.stack([out[i] for i in indices])


def test_sample_big_buck_bunny() -> None:
    path = SAMPLES / "bigbuckbunny.mp4"
    v = read_video(path, num_frames=32)
    assert v.source_num_frames == 132 and v.source_fps == 25.0 and v.duration_s == pytest.approx(5.28)
    assert v.source_size == v.decoded_size == (720, 1280)
    assert v.indices == uniform_indices(132, 32) and v.warnings == []
    # an independent decoder (FFmpeg 7 via PyAV), read front to back, gives the same pixels
    assert np.array_equal(v.frames, _pyav_frames(path, v.indices))
    # reduced decoding of a real 720p clip: measured max 20, mean 0.89 at a shorter side of 576
    full = read_video(path, num_frames=8, min_decode_side=None)
    small = read_video(path, num_frames=8, min_decode_side=576)
    assert small.decoded_size == (576, 1024) and small.indices == full.indices
    diff = np.abs(_resize_384(full.frames) - _resize_384(small.frames))
    assert diff.max() <= 28 and diff.mean() <= 1.1, (diff.max(), diff.mean())


def test_sample_box_seeks_inaccurately_and_is_read_forward() -> None:
    # box.mp4's container says its packets are in display order (pts == dts, no composition offsets) but
    # the H.264 decoder reorders them: neither decord's seeking nor the timestamps can be trusted
    path = SAMPLES / "box.mp4"
    v = read_video(path, num_frames=12, end_s=10.0)
    # 456 packets, the last one marked "discard" by the edit list: the decoder outputs 455 frames
    assert v.source_num_frames == 455 and v.source_fps == pytest.approx(456000 / 15217)
    assert v.source_size == v.decoded_size == (480, 640)
    assert v.indices == uniform_indices(455, 12, 0, math.ceil(10.0 * 456000 / 15217) - 1)
    assert v.decoder == "sequential" and any("forward" in w for w in v.warnings)
    reference = _pyav_frames(path, v.indices)
    for frame, ref, index in zip(v.frames, reference, v.indices, strict=True):
        # the same frame (the two FFmpeg versions' decoders agree to within a level or two)
        assert np.abs(frame.astype(int) - ref).mean() < 0.5, index
    # keyframe mode needs the timestamps: the exact frames, and a note
    v = read_video(path, num_frames=3, end_s=1.0, seek="keyframe")
    assert v.indices == [0, 14, 29] and v.max_shift_s == 0.0 and v.decoder == "sequential"
    assert "keyframe seeking needs timestamps this file lacks: decoded the exact frames instead" in v.warnings


def test_samples_questions_csv() -> None:
    with open(SAMPLES / "questions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == ["id", "video", "question", "options", "answer"]
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert (SAMPLES / row["video"]).is_file(), row
        assert row["question"].strip() and row["answer"].strip()
        if row["options"]:
            options = row["options"].split("|")
            letters = [o.split(".", 1)[0] for o in options]
            assert letters == [chr(ord("A") + i) for i in range(len(options))], row
            assert row["answer"] in letters, row
    for clip in SAMPLES.glob("*.mp4"):
        assert clip.stat().st_size <= 2 * 1024 * 1024, clip


def test_keyframe_chunks_split_whole_segments_balanced() -> None:
    from dycoke.video import keyframe_chunks

    keys = [0, 10, 20, 30]
    assert keyframe_chunks([1, 5, 12, 25, 31], keys, 1) == [[1, 5, 12, 25, 31]]
    assert keyframe_chunks([1, 5, 8], keys, 4) == [[1, 5, 8]]  # one segment: one reader
    assert keyframe_chunks([1, 12, 25, 31], keys, 4) == [[1], [12], [25], [31]]
    assert keyframe_chunks([1, 12, 15, 25, 31], keys, 2) == [[1, 12, 15], [25, 31]]
    chunks = keyframe_chunks(list(range(0, 40, 3)), keys, 3)
    assert [i for chunk in chunks for i in chunk] == list(range(0, 40, 3)) and len(chunks) == 3


@pytest.mark.parametrize("workers", ["1", "3", "8"])
def test_parallel_decoding_returns_the_same_frames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    path = write_video(tmp_path / "gop.mp4", numbered_frames(120, 64, 96), 25, gop=10)
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", workers)
    video = read_video(path, num_frames=16)
    assert [frame_number(f) for f in video.frames] == video.indices
    monkeypatch.setenv("DYCOKE_DECODE_WORKERS", "1")
    assert np.array_equal(read_video(path, num_frames=16).frames, video.frames)
