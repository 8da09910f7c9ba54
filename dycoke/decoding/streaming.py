"""A generation streamer that times every token and emits the answer text as it grows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers.generation.streamers import BaseStreamer


class TimedTextStreamer(BaseStreamer):
    """Receives token ids from ``generate``; records when each arrives; hands new text to a callback.

    ``generate`` first passes the prompt (ignored here), then each new token. Text is decoded from all
    tokens so far and only the new, complete suffix is emitted (a multi-byte character split across
    tokens is held back until it is whole).
    """

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.times: list[float] = []
        self._emitted = 0
        self._prompt_seen = False
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """Mark the start of generation (the reference point of ``first_token_s``)."""
        self._t0 = time.perf_counter()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        now = time.perf_counter()
        ids = value.reshape(-1).tolist()
        self.token_ids.extend(int(i) for i in ids)
        self.times.extend([now] * len(ids))
        if self.on_text is not None:
            self._emit(final=False)

    def end(self) -> None:
        if self.on_text is not None:
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        assert self.on_text is not None
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self._emitted:
            self.on_text(text[self._emitted :])
            self._emitted = len(text)

    @property
    def first_token_s(self) -> float | None:
        """Seconds from ``start()`` to the first generated token (prefill), or None if none came."""
        return self.times[0] - self._t0 if self.times else None

    @property
    def decode_s(self) -> float:
        """Seconds from the first to the last generated token."""
        return self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
