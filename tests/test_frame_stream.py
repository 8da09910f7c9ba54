"""``dycoke.frame_stream`` (a video read by a forked child into shared memory) and
``dycoke.stream_encode`` (the vision encoder taking the frames as they land)."""

from __future__ import annotations

import gc
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dycoke import frame_stream
from dycoke.config import ModelOptions, VideoOptions, run_options
from dycoke.errors import VideoError
from dycoke.frame_stream import FrameStream
from dycoke.pipeline import STREAM_VIDEO_ENV, VideoQA
from dycoke.reading import decode_video
from dycoke.stream_encode import _runs, group_size

pytestmark = pytest.mark.skipif(not frame_stream.forked_reading_available(), reason="needs fork and memfd (Linux)")

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "samples" / "bigbuckbunny.mp4"


def _memory_of(array: np.ndarray) -> Any:
    base: Any = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def _mapped(array: np.ndarray) -> bool:
    return isinstance(_memory_of(array), mmap.mmap)


def test_the_stream_gives_the_frames_of_a_plain_read_each_slot_landing_once() -> None:
    options = VideoOptions(num_frames=12)
    expected = decode_video(CLIP, options)
    landed: list[int] = []
    with FrameStream(CLIP, options) as stream:
        while (slots := stream.landed()) is not None:
            assert stream.frames is not None or not slots  # sized before any frame lands
            landed += slots
        got = stream.result()
    assert sorted(landed) == list(range(12))
    assert stream.generation == 1
    assert np.array_equal(got.frames.frames, expected.frames.frames)
    assert got.frames.indices == expected.frames.indices
    assert got.frames.timestamps_s == expected.frames.timestamps_s
    assert got.path == expected.path and 0 < got.decode_s < 60
    assert _mapped(got.frames.frames)  # the child's memory, never pickled across


def _read(options: VideoOptions) -> np.ndarray:
    with FrameStream(CLIP, options) as stream:
        return stream.result().frames.frames


def test_a_later_read_reuses_the_memory_of_frames_no_longer_alive() -> None:
    gc.collect()
    frame_stream._IDLE.clear()
    first = _read(VideoOptions(num_frames=10))
    memory = _memory_of(first)
    assert not frame_stream._IDLE  # in use
    kept = first.copy()
    held = _read(VideoOptions(num_frames=6, start_s=1.0))  # the first frames are alive: new memory
    assert _memory_of(held) is not memory and np.array_equal(first, kept)
    del first
    gc.collect()
    assert [arena.memory for arena in frame_stream._IDLE] == [memory]  # idle again
    smaller = _read(VideoOptions(num_frames=8))  # fits: written into it
    assert _memory_of(smaller) is memory and not frame_stream._IDLE
    assert np.array_equal(smaller, decode_video(CLIP, VideoOptions(num_frames=8)).frames.frames)
    assert np.array_equal(held, decode_video(CLIP, VideoOptions(num_frames=6, start_s=1.0)).frames.frames)
    del smaller, held
    gc.collect()
    assert len(frame_stream._IDLE) == 1 and frame_stream._IDLE[0].memory is memory  # the larger one kept


def test_a_failed_read_gives_the_memory_back() -> None:
    gc.collect()
    frame_stream._IDLE.clear()
    del_me = _read(VideoOptions(num_frames=4))
    del del_me
    gc.collect()
    (arena,) = frame_stream._IDLE
    with FrameStream(ROOT / "README.md", VideoOptions(num_frames=4)) as stream, pytest.raises(VideoError):
        stream.result()
    assert [arena] == frame_stream._IDLE


def test_without_notices_only_the_result_comes_back() -> None:
    with FrameStream(CLIP, VideoOptions(num_frames=4), notify=False) as stream:
        assert stream.landed() == []  # the array's size
        assert stream.landed() is None  # then the end: no frame notices
        assert stream.result().frames.frames.shape[0] == 4


@pytest.mark.parametrize(
    ("video", "message"),
    [("missing.mp4", "video not found"), ("README.md", "cannot read video .*README.md")],
)
def test_the_childs_error_is_raised_in_the_parent(video: str, message: str) -> None:
    with FrameStream(ROOT / video, VideoOptions(num_frames=4)) as stream, pytest.raises(VideoError, match=message):
        stream.result()
    assert stream.pid is None  # collected


def test_a_child_that_dies_is_reported_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frame_stream, "decode_video", lambda *args, **kwargs: os._exit(3))  # the fork inherits it
    ended = r"the decoding process ended \(exit status 3\)"
    with FrameStream(CLIP, VideoOptions(num_frames=4)) as stream, pytest.raises(VideoError, match=ended):
        stream.result()


def test_closing_ends_a_child_still_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frame_stream, "decode_video", lambda *args, **kwargs: time.sleep(60))
    started = time.perf_counter()
    stream = FrameStream(CLIP, VideoOptions(num_frames=4))
    stream.close()
    assert stream.pid is None and time.perf_counter() - started < 10


def _restarting_read(video: Any, options: Any, *, sink: Any) -> Any:
    """A read that fills its array, then falls back (as a failed seek does) and fills a new one."""
    decoded = decode_video(video, options)
    frames = decoded.frames.frames
    for _ in range(2):
        array = sink.allocate(frames.shape)
        for slot in range(frames.shape[0]):
            array[slot] = frames[slot]
            sink.landed([slot])
    return decoded


def test_a_restarted_read_maps_the_new_array(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(frame_stream, "decode_video", _restarting_read)
    options = VideoOptions(num_frames=6)
    with FrameStream(CLIP, options) as stream:
        landed = []
        while (slots := stream.landed()) is not None:
            landed += slots
        got = stream.result()
    assert stream.generation == 2 and sorted(landed) == sorted(list(range(6)) * 2)
    assert np.array_equal(got.frames.frames, decode_video(CLIP, options).frames.frames)


def test_runs_and_group_sizes() -> None:
    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)]
    assert _runs([]) == []
    assert [group_size(f) for f in (1, 32, 64, 128, 1024)] == [8, 8, 8, 16, 16]


@pytest.fixture(scope="module")
def qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu", dtype="float32"))


def _prepare(qa: VideoQA, monkeypatch: pytest.MonkeyPatch, stream: str, **kwargs: Any) -> Any:
    monkeypatch.setenv(STREAM_VIDEO_ENV, stream)
    return qa.prepare(CLIP, VideoOptions(num_frames=20), **kwargs)


def test_encoding_while_reading_gives_the_tokens_of_encoding_after(
    qa: VideoQA, monkeypatch: pytest.MonkeyPatch
) -> None:
    after = _prepare(qa, monkeypatch, "0")
    forks: list[int] = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    streamed = _prepare(qa, monkeypatch, "1")
    assert forks == [1] and after.encoded_while_reading == 0
    assert 0 <= streamed.encoded_while_reading <= 20
    assert torch.allclose(streamed.features, after.features, atol=1e-5, rtol=0)
    assert torch.equal(streamed.pixels, after.pixels) and torch.equal(streamed.newline, after.newline)
    assert streamed.frames.indices == after.frames.indices
    assert min(streamed.decode_s, streamed.preprocess_s, streamed.encode_s) >= 0
    options = run_options(None, max_new_tokens=6)
    report = qa.answer(streamed, "What is here?", options)
    assert report.token_ids == qa.answer(after, "What is here?", options).token_ids
    assert report.video.encoded_while_reading == streamed.encoded_while_reading


def test_a_bad_file_fails_the_same_way_streamed(qa: VideoQA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STREAM_VIDEO_ENV, "1")
    with pytest.raises(VideoError, match="not a video file"):
        qa.prepare(ROOT / "README.md", VideoOptions(num_frames=4))


def test_prumerges_signals_are_recorded_from_a_plain_read(qa: VideoQA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked for a read that records signals"))
    prepared = _prepare(qa, monkeypatch, "1", with_signals=True)
    assert prepared.vision is not None and prepared.encoded_while_reading == 0


def test_the_switch_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke.pipeline import streams_video

    monkeypatch.delenv(STREAM_VIDEO_ENV, raising=False)
    assert not streams_video()
    monkeypatch.setenv(STREAM_VIDEO_ENV, "1")
    assert streams_video()
    monkeypatch.setenv(STREAM_VIDEO_ENV, "off")
    assert not streams_video()


# -- the prefix prefilled while the video is read (dycoke.stream_prefill) ---------------------------


@pytest.mark.parametrize(("method", "frames"), [("full", 12), ("dycoke", 12), ("dycoke", 11), ("fastv", 8)])
def test_asking_with_the_prefix_prefilled_while_reading_gives_the_same_answer(
    qa: VideoQA, monkeypatch: pytest.MonkeyPatch, method: str, frames: int
) -> None:
    answers, prompts = {}, {}
    for stream in ("0", "1"):
        monkeypatch.setenv(STREAM_VIDEO_ENV, stream)
        report = qa.ask(CLIP, "What is here?", method=method, num_frames=frames, max_new_tokens=8)
        answers[stream], prompts[stream] = report.token_ids, report.tokens.prompt
    assert answers["1"] == answers["0"] and prompts["1"] == prompts["0"]


def test_the_prefix_is_memoised_for_the_question_asked(qa: VideoQA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STREAM_VIDEO_ENV, "1")
    options = run_options(None, method="dycoke", num_frames=12, max_new_tokens=4)
    prepared = qa.prepare(CLIP, options.video, prefill_for=(options, "What is here?"))
    (prefix,) = prepared.prefixes.values()
    tail = prefix.unreported_s
    assert tail > 0
    report = qa.answer(prepared, "What is here?", options)
    assert prefix.length < report.tokens.prompt  # the question continued it
    assert report.timings_s.shared_prefix == tail and prefix.unreported_s == 0.0  # reported once
    assert qa.answer(prepared, "What is here?", options).timings_s.shared_prefix == 0.0
    fresh = qa.prepare(CLIP, options.video)  # nothing to prefill for: no prefix
    assert not fresh.prefixes
    assert qa.answer(fresh, "What is here?", options).token_ids == report.token_ids


def test_chunks_follow_the_stable_frames(qa: VideoQA) -> None:
    from dycoke.methods import build_method
    from dycoke.stream_prefill import PrefixStream, chunk_frames

    loaded = qa.loaded
    method = build_method(run_options(None, method="dycoke").method, loaded.model, loaded.num_layers)
    assert [method.stable_frames(r, 16) for r in (0, 3, 4, 7, 9, 15, 16)] == [0, 0, 4, 4, 8, 12, 16]
    assert method.stable_frames(3, 4) == 3  # a video too short to merge is kept whole
    full = build_method(run_options(None, method="full").method, loaded.model, loaded.num_layers)
    assert full.stable_frames(7, 16) == 7
    fastv = build_method(run_options(None, method="fastv").method, loaded.model, loaded.num_layers)
    assert [fastv.stable_frames(r, 16) for r in (15, 16)] == [0, 16]
    assert [chunk_frames(f) for f in (8, 32, 128)] == [16, 16, 32]

    torch.manual_seed(0)
    frames, tokens = 40, loaded.tokens_per_frame
    features = torch.randn(frames, tokens, loaded.text_config.hidden_size)
    stream = PrefixStream(loaded, method, [1, 2, 3])
    stream.advance(features, 3)  # no whole window yet
    stream.advance(features, 15)  # three windows: fewer frames than a chunk (16)
    assert stream.frames_done == 0 and stream.cache.get_seq_length() == 0
    stream.advance(features, 21)  # five windows: 20 frames
    assert stream.frames_done == 20 and len(stream.prefilled) == 1
    stream.advance(features, frames, torch.zeros(1, features.shape[-1]))
    prefix = stream.result()
    whole = method.compress(features.reshape(-1, features.shape[-1]), frames, tokens)
    assert prefix is not None and prefix.length == 3 + whole.tokens.shape[0] + 1
    assert prefix.layers[0][0].shape[2] == prefix.length


def test_a_method_that_promises_too_much_loses_its_prefix(qa: VideoQA) -> None:
    from dycoke.methods import build_method
    from dycoke.stream_prefill import PrefixStream

    loaded = qa.loaded
    method = build_method(run_options(None, method="full").method, loaded.model, loaded.num_layers)
    liar = type("Liar", (), {"stable_frames": lambda self, ready, n: ready, "compress": None})()
    liar.compress = lambda features, n, t, vision=None: method.compress(features.flip(0), n, t)  # later frames matter
    features = torch.randn(32, loaded.tokens_per_frame, loaded.text_config.hidden_size)
    stream = PrefixStream(loaded, liar, [1])  # type: ignore[arg-type]
    stream.advance(features * (torch.arange(32) < 16).view(32, 1, 1), 16)
    assert stream.frames_done == 16
    stream.advance(features, 32, torch.zeros(1, features.shape[-1]))
    assert stream.result() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunk_attention_on_the_gpu_matches_a_materialised_mask() -> None:
    from dycoke.attention import chunk_prefill_attention

    torch.manual_seed(0)
    for q_len, keys in ((300, 1200), (64, 2000), (500, 500)):
        query = torch.randn(1, 28, q_len, 128, device="cuda", dtype=torch.bfloat16)
        key, value = (torch.randn(1, 4, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, _ = chunk_prefill_attention(torch.nn.Module(), query, key, value, None)
        allowed = torch.ones(q_len, keys, dtype=torch.bool, device="cuda").tril(diagonal=keys - q_len)
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float().repeat_interleave(7, 1), value.float().repeat_interleave(7, 1), attn_mask=allowed
        ).transpose(1, 2)
        assert (out.float() - expected).abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_streamed_answers_on_the_gpu_equal_decoded_first(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    gpu = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda", dtype="float32"))
    answers = {}
    for stream in ("0", "1"):
        monkeypatch.setenv(STREAM_VIDEO_ENV, stream)
        answers[stream] = gpu.ask(CLIP, "What is here?", method=method, num_frames=24, max_new_tokens=8).token_ids
    assert answers["1"] == answers["0"]


def test_readers_take_the_passes_in_turn_for_a_sink_that_wants_them_in_order() -> None:
    from dycoke.video.readers import deal_runs

    assert deal_runs([1.0] * 7, 3, in_order=True) == [[0, 3, 6], [1, 4], [2, 5]]
    assert deal_runs([1.0] * 6, 3) == [[0, 1], [2, 3], [4, 5]]  # contiguous otherwise
    assert deal_runs([1.0] * 2, 5, in_order=True) == [[0], [1]]
    assert deal_runs([5.0], 4, in_order=True) == [[0]]


def test_a_sink_that_wants_frames_in_order_gets_the_passes_dealt_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke.video import readers

    asked: list[bool] = []
    deal = readers.deal_runs
    monkeypatch.setattr(readers, "deal_runs", lambda *a, in_order=False: asked.append(in_order) or deal(*a))

    class Sink:
        def __init__(self, in_order: bool) -> None:
            self.in_order = in_order
            self.slots: list[int] = []

        def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
            return np.empty(shape, dtype=np.uint8)

        def landed(self, slots: list[int]) -> None:
            self.slots += slots

    for in_order in (True, False):
        sink = Sink(in_order)
        got = decode_video(CLIP, VideoOptions(num_frames=6), sink=sink)
        assert sorted(sink.slots) == list(range(6)) and got.frames.frames.shape[0] == 6
    assert asked == [True, False]


def test_no_fork_to_be_had_reads_first_instead(qa: VideoQA, monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke import reading

    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    monkeypatch.setenv(STREAM_VIDEO_ENV, "1")
    prepared = qa.prepare(CLIP, VideoOptions(num_frames=6))
    assert prepared.encoded_while_reading == 0 and prepared.features.shape[0] == 6 * prepared.tokens_per_frame
    got = reading.start_reading(CLIP, VideoOptions(num_frames=6), separate_process=True).result()
    assert np.array_equal(got.frames.frames, prepared.frames.frames)


def test_a_bad_question_ends_the_reading_child(qa: VideoQA, monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke.errors import ConfigError

    streams: list[FrameStream] = []
    original = frame_stream.FrameStream.__init__

    def recording(self: FrameStream, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(frame_stream.FrameStream, "__init__", recording)
    monkeypatch.setenv(STREAM_VIDEO_ENV, "1")
    options = run_options(None, num_frames=6)
    with pytest.raises(ConfigError):
        qa.prepare(CLIP, options.video, prefill_for=(options, "   "))
    assert len(streams) == 1 and streams[0].pid is None  # collected, not left running
