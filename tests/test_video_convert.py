"""dycoke.video.convert: decoded frames to RGB off the decoding thread, byte for byte PyAV's own
conversion, every frame at its position, errors raised to the reader, a bounded number waiting."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from dycoke.errors import VideoError
from dycoke.video.convert import RgbConverter, _Contexts, convert_frame

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "bigbuckbunny.mp4"


@pytest.fixture(scope="module")
def frames() -> list[av.VideoFrame]:
    with av.open(str(SAMPLE)) as container:
        return [frame for _, frame in zip(range(12), container.decode(video=0), strict=False)]


class DictStore:
    def __init__(self) -> None:
        self.frames: dict[int, np.ndarray] = {}
        self.threads: set[str] = set()

    def put(self, position: int, frame: np.ndarray) -> None:
        self.threads.add(threading.current_thread().name)
        self.frames[position] = frame


def test_full_size_is_pyavs_own_rgb(frames: list[av.VideoFrame]) -> None:
    contexts = _Contexts()
    for frame in frames:
        rgb = convert_frame(frame, (720, 1280), contexts)
        assert rgb.shape == (720, 1280, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb, frame.to_ndarray(format="rgb24"))


def test_reduced_size_is_rgb_then_bicubic(frames: list[av.VideoFrame]) -> None:
    contexts = _Contexts()
    for frame in frames[:4]:
        expected = frame.reformat(format="rgb24").reformat(width=800, height=450, interpolation="BICUBIC")
        assert np.array_equal(convert_frame(frame, (450, 800), contexts), expected.to_ndarray())


@pytest.mark.parametrize("threads", [1, 3])
def test_every_frame_lands_at_its_position(frames: list[av.VideoFrame], threads: int) -> None:
    store = DictStore()
    with RgbConverter(store, (360, 640), threads) as convert:
        for position, frame in zip(range(100, 112), frames, strict=True):
            convert.submit(position, frame)
    assert sorted(store.frames) == list(range(100, 112))
    contexts = _Contexts()
    for position, frame in zip(range(100, 112), frames, strict=True):
        assert np.array_equal(store.frames[position], convert_frame(frame, (360, 640), contexts))
    pool_threads = {name for name in store.threads if name.startswith("dycoke-rgb")}
    assert (len(pool_threads) >= 1) == (threads > 1)


def test_a_failed_put_is_raised_to_the_reader(frames: list[av.VideoFrame]) -> None:
    class Failing(DictStore):
        def put(self, position: int, frame: np.ndarray) -> None:
            if position == 2:
                raise VideoError("cannot read video x.mp4: decoder returned a frame of shape (1, 1, 3)")
            super().put(position, frame)

    store = Failing()
    with pytest.raises(VideoError, match="shape"), RgbConverter(store, (90, 160), 2) as convert:
        for position, frame in enumerate(frames):
            convert.submit(position, frame)
    assert 2 not in store.frames


def test_submit_stops_the_decode_once_a_conversion_failed(frames: list[av.VideoFrame]) -> None:
    failed = threading.Event()

    class Failing(DictStore):
        def put(self, position: int, frame: np.ndarray) -> None:
            failed.set()
            raise VideoError("disk full")

    with pytest.raises(VideoError, match="disk full"), RgbConverter(Failing(), (90, 160), 2) as convert:
        convert.submit(0, frames[0])
        assert failed.wait(10)
        deadline = time.monotonic() + 10
        while convert.error is None and time.monotonic() < deadline:  # recorded as the put raises
            time.sleep(0.001)
        convert.submit(1, frames[1])  # raises here, before leaving the block
        pytest.fail("submit went on after a failed conversion")


def test_at_most_two_frames_per_thread_wait(frames: list[av.VideoFrame]) -> None:
    release = threading.Event()

    class Slow(DictStore):
        def put(self, position: int, frame: np.ndarray) -> None:
            release.wait(10)
            super().put(position, frame)

    store = Slow()
    submitted: list[int] = []
    with RgbConverter(store, (90, 160), 2) as convert:

        def feed() -> None:
            for position, frame in enumerate(frames[:6]):
                convert.submit(position, frame)
                submitted.append(position)

        feeder = threading.Thread(target=feed)
        feeder.start()
        feeder.join(1.0)
        assert len(submitted) == 4  # 2 threads x 2: the fifth waits for room
        release.set()
        feeder.join(10)
    assert submitted == list(range(6)) and sorted(store.frames) == list(range(6))
