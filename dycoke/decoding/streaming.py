"""A generation streamer that times every decode step and emits each row's answer text as it grows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from transformers.generation.streamers import BaseStreamer

TextCallback = Callable[[str], None]


class TimedTextStreamer(BaseStreamer):
    """Receives token ids from generation; records when each step arrives; hands new text to callbacks.

    ``generate`` first passes the prompt (ignored here), then each step's (B,) tokens. ``on_text``
    receives row 0's text, or ``on_texts[i]`` row i's (None: that row is not streamed). Text is decoded
    from all of a row's tokens so far and only the new, complete suffix is emitted (a multi-byte
    character split across tokens is held back until it is whole).
    """

    def __init__(
        self,
        tokenizer: Any,
        on_text: TextCallback | None = None,
        on_texts: Sequence[TextCallback | None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.callbacks: list[TextCallback | None] = list(on_texts) if on_texts is not None else [on_text]
        self.rows: list[list[int]] = []
        self.times: list[float] = []  # one entry per step
        self._emitted: list[int] = []
        self._prompt_seen = False
        self._t0 = time.perf_counter()

    def start(self) -> None:
        """Mark the start of generation (the reference point of ``first_token_s``)."""
        self._t0 = time.perf_counter()

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        ids = [int(i) for i in value.reshape(-1).tolist()]
        if not self.rows:
            self.rows = [[] for _ in ids]
            self._emitted = [0] * len(ids)
        for row, token in zip(self.rows, ids, strict=True):
            row.append(token)
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        for index, callback in enumerate(self.callbacks):
            if callback is None or index >= len(self.rows):
                continue
            text = self.tokenizer.decode(self.rows[index], skip_special_tokens=True)
            if not final and text.endswith("\ufffd"):
                continue
            if len(text) > self._emitted[index]:
                callback(text[self._emitted[index] :])
                self._emitted[index] = len(text)

    @property
    def token_ids(self) -> list[int]:
        """Row 0's tokens so far."""
        return self.rows[0] if self.rows else []

    @property
    def first_token_s(self) -> float | None:
        """Seconds from ``start()`` to the first generated token (prefill), or None if none came."""
        return self.times[0] - self._t0 if self.times else None

    @property
    def decode_s(self) -> float:
        """Seconds from the first to the last generated token."""
        return self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
