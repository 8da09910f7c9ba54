"""Decoding the planned frames: decord readers in parallel, PyAV seeking by timestamp, or forward from
the start."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from dycoke.errors import VideoError
from dycoke.video.convert import RgbConverter, convert_threads
from dycoke.video.index import StreamIndex
from dycoke.video.native import _av_errors, _import_av, _SeekFailed
from dycoke.video.plan import _balanced, _cpu_count, _Run


class FrameSink(Protocol):
    """Where a read's frames go instead of a private array, and who hears of each one as it lands
    (``dycoke.frame_stream``: shared memory, read by another process while the decode goes on).

    ``in_order``: the consumer works through the frames in order (a prefill continues from the first
    frames), so several readers share the forward passes out in turn (reader r takes passes r, r + R,
    ...) and the first frames land first, instead of each reader taking a contiguous part of the video
    and the first part being complete only when its reader ends."""

    in_order: bool

    def allocate(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """A writable (F, H, W, 3) uint8 array for the read's frames (called once per read, or again
        when a read falls back to decoding forward from the start)."""
        ...

    def landed(self, slots: list[int]) -> None:
        """Slots of that array now hold their frame (called from the readers' threads)."""
        ...


class FrameStore:
    """The (F, H, W, 3) uint8 array ``read_video`` returns, filled by the readers' threads as frames come
    out of their decoders, each frame at every slot of ``targets`` that asks for its display position.

    Stacking the frames at the end instead copied them all again on one thread, into memory the
    process had never touched: 128 frames of 720p (354 MB) took 0.08-0.36 s to stack on the 2-core
    machine, and 0.04-0.05 s to place from four threads (page faults included). With a ``sink`` the
    array is the sink's, and the sink hears of every slot filled."""

    def __init__(self, name: str, targets: Sequence[int], size: tuple[int, int], sink: FrameSink | None = None) -> None:
        self.name = name
        shape = (len(targets), size[0], size[1], 3)
        self.frames = sink.allocate(shape) if sink is not None else np.empty(shape, dtype=np.uint8)
        self.sink = sink
        self.slots: dict[int, list[int]] = {}
        for slot, position in enumerate(targets):
            self.slots.setdefault(int(position), []).append(slot)

    def put(self, position: int, frame: np.ndarray) -> None:
        """Place the frame at display ``position`` (numpy copies without the GIL)."""
        if frame.shape != self.frames.shape[1:]:
            raise VideoError(
                f"cannot read video {self.name}: decoder returned a frame of shape {frame.shape}, "
                f"expected {self.frames.shape[1:]}"
            )
        for slot in self.slots[position]:
            self.frames[slot] = frame
        if self.sink is not None:
            self.sink.landed(self.slots[position])


# -- decoding with decord --------------------------------------------------------------------------


def _read_parallel(open_reader: Any, reader: Any | None, chunks: list[list[int]], store: FrameStore) -> np.ndarray:
    """Decode each chunk with its own reader on its own thread (decord releases the GIL while it
    decodes); the first chunk uses ``reader`` when given, the others ``open_reader()``. Returns the
    store's frames, in the order of the chunks."""

    def decode(job: tuple[int, list[int]]) -> None:
        number, chunk = job
        own = reader if number == 0 and reader is not None else open_reader()
        batch = np.asarray(own.get_batch(chunk).asnumpy())
        if batch.shape[0] != len(chunk):
            got = batch.shape[0]
            raise VideoError(f"cannot read video {store.name}: decoder returned {got} of {len(chunk)} frames")
        for position, frame in zip(chunk, batch, strict=True):
            store.put(position, frame)

    if len(chunks) == 1:
        decode((0, chunks[0]))
        return store.frames
    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="dycoke-video") as pool:
        list(pool.map(decode, enumerate(chunks)))
    return store.frames


# -- decoding with PyAV ----------------------------------------------------------------------------


def _configure_threads(stream: Any, threads: int) -> None:
    """FFmpeg's own decoding threads for one container: frame and slice threading when it has cores."""
    codec = stream.codec_context
    codec.thread_count = max(1, threads)
    codec.thread_type = "AUTO" if threads > 1 else "SLICE"


def _seek(
    container: Any, stream: Any, index: StreamIndex, run: _Run, position_of: dict[int, int]
) -> tuple[Any, Iterator[Any]]:
    """Seek so that demuxing starts at (or before) the run's key frame.

    Returns the first packet and the iterator of the ones after it. Demuxers seek by pts (Matroska)
    or by dts (MP4, AVI): the key frame's pts is tried first, then its dts, then earlier key frames,
    then the start of the file; a landing is accepted when the first packet is at or before the key
    frame in decoding order (``position_of``: pts -> decoding position).
    """
    tries: list[int | None] = []
    if run.key >= 0:
        tries += [int(index.pts[run.key]), int(index.dts[run.key])]
        earlier = [k for k in index.key_positions if k < run.key][-2:]
        tries += [int(index.pts[k]) for k in reversed(earlier)]
    tries.append(None)
    for timestamp in dict.fromkeys(tries):
        if timestamp is None:
            container.seek(0, backward=True)  # the start, in AV_TIME_BASE units
        else:
            container.seek(timestamp, stream=stream, backward=True, any_frame=False)
        packets = iter(container.demux(stream))
        for first in packets:
            if first.size == 0 and first.pts is None:
                break  # end of the stream: seeking went past everything
            if first.is_discard or first.size == 0:
                continue
            position = position_of.get(first.pts)
            if timestamp is None or (position is not None and position <= run.start):
                return first, packets
            break
    raise _SeekFailed(f"seeking to frame {run.targets[0]} did not land at or before its key frame")


def _decode_runs(name: str, index: StreamIndex, runs: Sequence[_Run], threads: int, convert: RgbConverter) -> None:
    """Decode the targets of ``runs`` with one PyAV container: per run, one seek and a forward decode
    up to the run's last target, frames matched by pts, each handed to ``convert``."""
    av = _import_av()
    with _av_errors(name), av.open(name) as container:
        stream = container.streams[index.stream]
        _configure_threads(stream, threads)
        position_of = dict(zip(index.pts.tolist(), index.decode_position.tolist(), strict=True))
        for run in runs:
            wanted = {int(index.pts[t]): t for t in run.targets}
            last = int(index.pts[run.targets[-1]])
            first, packets = _seek(container, stream, index, run, position_of)
            previous: int | None = None
            for packet in itertools.chain([first], packets):
                for frame in packet.decode():
                    pts = frame.pts
                    if pts is None or (previous is not None and pts <= previous):
                        raise _SeekFailed(f"the decoder returned frames out of timestamp order near {previous}")
                    previous = pts
                    position = wanted.pop(pts, None)
                    if position is not None:
                        convert.submit(position, frame)
                if not wanted or (previous is not None and previous >= last):
                    break
            if wanted:
                missing = min(wanted.values())
                raise _SeekFailed(f"frame {missing} did not come out of the decoder after seeking")


def deal_runs(costs: Sequence[float], workers: int, *, in_order: bool = False) -> list[list[int]]:
    """Positions of the forward passes (of ``costs``) each of at most ``workers`` readers decodes:
    contiguous groups of similar total cost, or with ``in_order`` in turn (reader r: r, r + R, ...)."""
    if not in_order:
        return _balanced(costs, workers)
    count = max(1, min(workers, len(costs)))
    return [list(range(first, len(costs), count)) for first in range(count)]


def _read_pyav(
    name: str,
    index: StreamIndex,
    runs: list[_Run],
    size: tuple[int, int],
    workers: int,
    threads: int | None = None,
    sink: FrameSink | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the runs' targets, the runs dealt out to ``workers`` threads as contiguous groups balanced
    by cost (in turn for a sink that wants the frames in order, ``deal_runs``), each with its own
    container and ``threads`` FFmpeg decoding threads (default: the CPUs shared out). Returns (frames
    in target order, readers used)."""
    groups = deal_runs([r.cost for r in runs], workers, in_order=sink is not None and sink.in_order)
    threads = threads or max(1, _cpu_count() // len(groups))
    jobs = [[runs[i] for i in group] for group in groups]
    store = FrameStore(name, [t for r in runs for t in r.targets], size, sink)
    with RgbConverter(store, size, convert_threads()) as convert:
        if len(jobs) == 1:
            _decode_runs(name, index, jobs[0], threads, convert)
        else:
            with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="dycoke-video") as pool:
                list(pool.map(lambda job: _decode_runs(name, index, job, threads, convert), jobs))
    return store.frames, len(jobs)


def _read_sequential(
    name: str, index: StreamIndex, targets: Sequence[int], size: tuple[int, int], sink: FrameSink | None = None
) -> np.ndarray:
    """Decode forward from the start, the i-th frame out of the decoder being frame i (no seeking, no
    timestamps): for files whose timestamps cannot be trusted."""
    av = _import_av()
    wanted = set(targets)
    store = FrameStore(name, targets, size, sink)
    last = max(targets)
    with _av_errors(name), av.open(name) as container, RgbConverter(store, size, convert_threads()) as convert:
        stream = container.streams[index.stream]
        _configure_threads(stream, _cpu_count())
        for position, frame in enumerate(container.decode(stream)):
            if position in wanted:
                convert.submit(position, frame)
                wanted.discard(position)
            if position >= last:
                break
    if wanted:
        raise VideoError(f"cannot read video {name}: the decoder stopped before frame {min(wanted)} (truncated file?)")
    return store.frames
