"""Planning a read: which frames each seek decodes, keyframe mode's targets, how many readers."""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from dataclasses import dataclass

from dycoke.video.index import StreamIndex

MAX_DECODE_WORKERS = 8
"""Default cap on the readers decoding one video at once (``DYCOKE_DECODE_WORKERS`` overrides)."""

# -- planning the decode ---------------------------------------------------------------------------


def keyframe_targets(
    indices: Sequence[int], key_positions: Sequence[int], first: int = 0, last: int | None = None
) -> list[int]:
    """The frames ``seek="keyframe"`` returns for the sampled ``indices`` (ascending, distinct).

    Each index takes the key frame nearest to it (by display position, the earlier one on a tie) among
    the key frames within ``first..last`` (the sampling window). Where several indices have the same
    nearest key frame, the one closest to it takes it and the others keep their own (exact) frame; so
    the result is ascending and never repeats a frame. Without a key frame in the window, ``indices``.
    """
    keys = [k for k in sorted(set(key_positions)) if first <= k and (last is None or k <= last)]
    out = list(indices)
    if not keys or not out:
        return out
    members: dict[int, list[int]] = {}
    for j, index in enumerate(indices):
        above = bisect.bisect_left(keys, index)
        if above < len(keys) and keys[above] == index:
            nearest = index
        elif above == 0:
            nearest = keys[0]
        elif above == len(keys) or index - keys[above - 1] <= keys[above] - index:
            nearest = keys[above - 1]
        else:
            nearest = keys[above]
        members.setdefault(nearest, []).append(j)
    for key, group in members.items():
        winner = min(group, key=lambda j: (abs(indices[j] - key), indices[j]))
        out[winner] = key
    return out


@dataclass
class _Run:
    """One seek and a forward decode: from key frame ``key`` (display position; -1 for the start of the
    file) through the packets up to decoding position ``reach``, returning the frames ``targets``."""

    key: int
    start: int  # decoding position of the key frame (0 for the start of the file)
    reach: int
    targets: list[int]

    @property
    def cost(self) -> int:
        """Frames decoded: the packets from the key frame to the last one a target needs."""
        return self.reach - self.start + 1


def _plan(index: StreamIndex, targets: Sequence[int]) -> list[_Run]:
    """Seeks and forward decodes that return ``targets`` (ascending display positions).

    A target is decoded from the last key frame shown at or before it. It joins the previous run
    (no new seek) when that run already feeds the decoder its key frame (or the packet just before
    it): decoding on is never more work than seeking back to the key frame.
    """
    keys = index.key_positions
    runs: list[_Run] = []
    for target in targets:
        j = bisect.bisect_right(keys, target) - 1
        key = keys[j] if j >= 0 else -1
        start = int(index.decode_position[key]) if key >= 0 else 0
        need = int(index.decode_position[target])
        if runs and runs[-1].start <= start <= runs[-1].reach + 1:
            runs[-1].reach = max(runs[-1].reach, need)
            runs[-1].targets.append(target)
        else:
            runs.append(_Run(key, start, max(need, start), [target]))
    return runs


def _sequential_cost(index: StreamIndex, targets: Sequence[int]) -> int:
    """Frames decoded reading forward from the start up to the last target."""
    return int(index.decode_position[: max(targets) + 1].max()) + 1 if targets else 0


def _balanced(costs: Sequence[float], workers: int) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` cut into at most ``workers`` contiguous groups of similar total cost."""
    workers = min(workers, len(costs))
    if workers <= 1:
        return [list(range(len(costs)))]
    target = sum(costs) / workers
    groups: list[list[int]] = [[]]
    load = 0.0
    for position, cost in enumerate(costs):
        if groups[-1] and load + cost / 2 > target and len(groups) < workers:
            groups.append([])
            load = 0.0
        groups[-1].append(position)
        load += cost
    return groups


def _cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


FRAMES_PER_READER = 400
"""For decord: below this much work per reader (frames to decode) another reader costs more
(opening the file, building its index) than it saves (2 cores: a 20-s clip read 0.74 s with one reader,
0.95 s with two; a 3-min one 5.0 s and 3.6 s)."""

FRAMES_PER_SEEKING_READER = 25
SEEK_COST_FRAMES = 5
"""For PyAV, whose readers open in milliseconds (they seek by timestamp in the demux index, they build
none): one more reader per ``FRAMES_PER_SEEKING_READER`` frames of work, a seek counting as
``SEEK_COST_FRAMES`` frames, up to one per CPU and one per seek (32 key frames of a 10-min clip, one
frame each: one reader took 0.73 s on 16 CPUs). On the 3-min 1080p clip
(3566 frames to decode for 32 exact frames), 16 CPUs: 16 readers of one thread 0.79 s, 8 of two
0.87 s, 8 of one 1.20 s, 22 of one 1.00 s; 2 CPUs: 2 readers of one thread 3.39 s, of two 4.36 s, one
reader 6.19 s (``benchmarks/tune_video_readers.py``)."""


def decode_workers(segments: int | None = None, work: float | None = None, *, seeking: bool = False) -> int:
    """Readers decoding at once: ``DYCOKE_DECODE_WORKERS`` when set to a positive integer, else one
    per ``FRAMES_PER_READER`` of ``work`` (frames to decode) when given, at most
    ``min(CPUs, MAX_DECODE_WORKERS)``; with ``seeking`` (PyAV readers) one per
    ``FRAMES_PER_SEEKING_READER`` with ``SEEK_COST_FRAMES`` added per segment, at most one per CPU.
    Never more than ``segments`` (the key-frame segments or seeks the sampled frames need) when given."""
    configured = os.environ.get("DYCOKE_DECODE_WORKERS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        workers = int(configured)
    else:
        workers = _cpu_count() if seeking else min(_cpu_count(), MAX_DECODE_WORKERS)
        if work is not None and seeking:
            work += SEEK_COST_FRAMES * (segments or 1)
            workers = min(workers, max(1, int(work // FRAMES_PER_SEEKING_READER)))
        elif work is not None:
            workers = min(workers, max(1, int(work // FRAMES_PER_READER)))
    return max(1, min(workers, segments)) if segments is not None else workers


def keyframe_chunks(indices: Sequence[int], key_indices: Sequence[int], workers: int) -> list[list[int]]:
    """Split ascending frame ``indices`` into at most ``workers`` runs of whole key-frame segments.

    A reader that jumps to frame i decodes from the key frame before i; frames of one segment are best
    decoded by one reader in order. Segments are dealt out as contiguous runs balanced by the frames
    each reader must decode (from its segment's key frame to its last sampled frame). One run (no
    parallelism) when the sampled frames share a single segment.
    """
    if workers <= 1 or not indices:
        return [list(indices)]
    keys = sorted(set(key_indices) | {0})
    segments: list[list[int]] = []
    segment_costs: list[int] = []
    current = -1
    for index in indices:
        segment = bisect.bisect_right(keys, index) - 1
        if segment != current:
            segments.append([])
            segment_costs.append(0)
            current = segment
        segments[-1].append(index)
        segment_costs[-1] = index - keys[segment] + 1
    if len(segments) < 2:
        return [list(indices)]
    return [[i for s in group for i in segments[s]] for group in _balanced(segment_costs, workers)]
