"""An LRU cache of prepared videos (decoded, preprocessed, encoded; with their memoised prefix KV),
bounded by the bytes they hold.

A key is the file's identity (see ``media.VideoSource``), the video options that decide the frames,
and whether the vision tower's signals were recorded (PruMerge needs them; a video prepared with them
serves every method). Sizes come from ``PreparedVideo.nbytes()`` and are measured again after every
answer, since the pipeline memoises the shared-prefix KV on the prepared video as it answers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any

from dycoke.config import VideoOptions

if TYPE_CHECKING:
    from dycoke.pipeline import PreparedVideo

CacheKey = tuple[Any, ...]


def cache_key(identity: tuple[str | int, ...], video: VideoOptions, with_signals: bool) -> CacheKey:
    return (identity, astuple(video), with_signals)


@dataclass
class _Entry:
    prepared: PreparedVideo
    nbytes: int


class PreparedCache:
    """Prepared videos, least recently used evicted first beyond ``max_bytes`` (0: keep nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, identity: tuple[str | int, ...], video: VideoOptions, with_signals: bool) -> PreparedVideo | None:
        """The prepared video for these frames, or None; one prepared with signals serves a request without."""
        candidates = [cache_key(identity, video, True)]
        if not with_signals:
            candidates.append(cache_key(identity, video, False))
        with self._lock:
            for key in candidates:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry.prepared
            self.misses += 1
            return None

    def put(self, identity: tuple[str | int, ...], video: VideoOptions, prepared: PreparedVideo) -> None:
        """Keep ``prepared`` (most recently used), then evict beyond the budget."""
        key = cache_key(identity, video, prepared.vision is not None)
        size = _size(prepared)
        with self._lock:
            self._entries[key] = _Entry(prepared, size)
            self._entries.move_to_end(key)
            if key[2]:  # the version with signals supersedes the one without
                self._entries.pop(cache_key(identity, video, False), None)
            self._evict()

    def refresh(self, prepared: PreparedVideo) -> None:
        """Measure ``prepared`` again (it grew: memoised prefix KV, vision signals), then evict."""
        size = _size(prepared)
        with self._lock:
            for entry in self._entries.values():
                if entry.prepared is prepared:
                    entry.nbytes = size
            self._evict()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": sum(e.nbytes for e in self._entries.values()),
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _evict(self) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        while self._entries and total > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            total -= entry.nbytes
            self.evictions += 1


def _size(prepared: PreparedVideo) -> int:
    return int(prepared.nbytes())
