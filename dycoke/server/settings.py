"""What ``dycoke serve`` is started with, validated on construction (no torch, no web framework)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dycoke.config import DEFAULT_MODEL, ModelOptions, RunOptions
from dycoke.errors import ConfigError


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one server process: one model, one worker, one listening address.

    Attributes:
        model: hub id or local checkpoint directory (ignored when ``serve`` is handed a loaded model).
        device, dtype: where and how the model loads (as ``dycoke ask``).
        host, port: the address to listen on (loopback by default).
        allowed_local_media_paths: folders whose files ``file://`` video URLs may name (after symlinks
            and ``..`` are resolved); none: local files are refused.
        max_upload_mb: largest video a ``data:`` URL may carry (decoded bytes); larger requests get 413.
        cache_gb: memory the prepared-video cache may hold (0: keep nothing between requests).
        api_key: when set, every ``/v1`` request must send ``Authorization: Bearer <key>``.
        max_batch_size: most requests answered together (same video, same options).
        max_queue: most requests waiting or running; more get 503.
        batch_wait_ms: when clients ask concurrently (requests came while the last batch ran, or the last
            batch answered several), how long a new batch waits at most for more requests on its video
            before it starts: for a full batch, or as many as the last batch answered (0: never).
        defaults: the options of a request that sets none (its fields override these).
        warmup: answer one short question on a synthetic clip before listening (skipped on CPU).
        shutdown_timeout_s: on SIGTERM/Ctrl-C, how long running requests may finish before they are
            cancelled (the process exits within about 2 s more).
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8765
    allowed_local_media_paths: tuple[Path, ...] = ()
    max_upload_mb: float = 512.0
    cache_gb: float = 4.0
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 256
    batch_wait_ms: float = 20.0
    defaults: RunOptions = field(default_factory=RunOptions)
    warmup: bool = True
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        ModelOptions(model=self.model, device=self.device, dtype=self.dtype)  # same checks as ``ask``
        if not self.host:
            raise ConfigError("host must be an address to listen on, e.g. 127.0.0.1, got an empty string")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be an integer in [1, 65535], got {self.port}")
        resolved: list[Path] = []
        for folder in self.allowed_local_media_paths:
            path = Path(folder).expanduser()
            if not path.is_dir():
                what = "is not a folder" if path.exists() else "does not exist"
                raise ConfigError(f"allowed-local-media-path {folder} {what}")
            resolved.append(path.resolve())
        object.__setattr__(self, "allowed_local_media_paths", tuple(resolved))
        _positive("max-upload-mb", self.max_upload_mb)
        if not (math.isfinite(self.cache_gb) and self.cache_gb >= 0):
            raise ConfigError(f"cache-gb must be a number >= 0 (0 keeps nothing), got {self.cache_gb}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api-key must not be empty (leave it unset to accept every request)")
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ConfigError(f"batch-wait-ms must be in [0, 10000], got {self.batch_wait_ms}")
        if isinstance(self.max_batch_size, bool) or self.max_batch_size < 1:
            raise ConfigError(f"max-batch-size must be a positive integer, got {self.max_batch_size}")
        if isinstance(self.max_queue, bool) or self.max_queue < 1:
            raise ConfigError(f"max-queue must be a positive integer, got {self.max_queue}")
        _positive("shutdown-timeout-s", self.shutdown_timeout_s)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gb * 1024**3)


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value}")
