"""What every compression method provides to the pipeline, and the registry of methods by name.

A method chooses the visual tokens that enter the LLM (``compress``) and may install attention glue
around decoding (``decoding``). Its math lives in ``dycoke/compress/`` (torch only); its module in this
package binds that math to a loaded model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dycoke.config import METHODS, MethodOptions
from dycoke.errors import ConfigError


@dataclass
class CompressedVisual:
    """Visual tokens given to the LLM (newline token excluded).

    Attributes:
        tokens: (N, D) tokens in LLM order.
        per_frame: tokens kept per frame (sums to N).
        frame_index: (N,) source frame of each token, or None when unchanged from raster order.
        patch_index: (N,) pooled-grid position (0..T-1) of each token, or None likewise.
    """

    tokens: torch.Tensor
    per_frame: list[int]
    frame_index: torch.Tensor | None = None
    patch_index: torch.Tensor | None = None


@dataclass
class VisionSignals:
    """What the vision tower saw, for methods that select inside it (PruMerge).

    Attributes:
        scores: (F, T) attention each pooled token receives (mean over heads and patch queries).
        keys: (F, T, C) keys of that layer (heads concatenated), pooled like the features.
    """

    scores: torch.Tensor
    keys: torch.Tensor


@dataclass
class Compaction:
    """Layers from ``first_layer`` on store only ``slots`` (B, S') of the ``prompt_length`` prompt slots
    (then every generated token): FastV after prefill, DyCoke's eviction after the first decode step."""

    first_layer: int
    slots: torch.Tensor
    prompt_length: int


class CompressionMethod(Protocol):
    """What every method provides to the pipeline."""

    name: str
    shares_prefix: bool  # whether the prefilled system prompt + video can serve every question
    needs_vision_signals: bool
    record: bool  # keep what a drawing needs (set by the pipeline when asked)
    warnings: list[str]  # what the user should know about the last ``compress`` (one line each)

    @property
    def compacts_in_decode(self) -> bool:
        """Whether ``compaction`` may first answer after a decode step (not at prefill)."""
        ...

    def compaction(self) -> Compaction | None:
        """During or after generation: which later layers store fewer prompt entries, once known."""
        ...

    @property
    def splits_rows(self) -> bool:
        """During ``decoding``: whether a static decoder may prefill a batch and take its first decode step
        in groups of rows (``row_scope``), a method whose cache that step compacts (lowers the peak)."""
        ...

    def row_scope(self, start: int, stop: int) -> AbstractContextManager[None]:
        """Where ``splits_rows``: a block in which the method's per-row state is that of rows
        ``start..stop`` of the batch alone; leaving it stores what they decided into the batch's."""
        ...

    def dropped_kv(self) -> tuple[int, int] | None:
        """After generation: (first layer, entries per layer) the cache no longer stores, or None."""
        ...

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        """(F*T, D) frame tokens -> the tokens the LLM sees."""
        ...

    def stable_frames(self, ready: int, num_frames: int) -> int:
        """With the first ``ready`` of ``num_frames`` frames encoded: how many leading frames have tokens
        that no later frame changes (``compress`` of the whole video, whatever the later frames hold,
        begins with those tokens). The video's prefill can start on them while the rest decodes."""
        ...

    def decoding(self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024) -> Any:
        """A context manager installed around generation (attention glue); ``num_visual`` counts the
        visual tokens placed at ``visual_start`` ((B,) per sample, or one int; newline included).
        It yields an empty cache to prefill into (a method whose later layers store fewer entries) or None."""
        ...

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        """Method-specific figures for the report of row ``sample`` of the batch, which generated
        ``generated`` tokens."""
        ...


def whole_batch_only(self: Any, start: int, stop: int) -> AbstractContextManager[None]:
    """``row_scope`` of a method that never splits a batch's rows (``splits_rows`` False)."""
    raise NotImplementedError(f"{type(self).__name__} decodes a batch's rows together")


def all_frames_stable(ready: int, num_frames: int) -> int:
    """``stable_frames`` of a method whose tokens may depend on every frame: none before the last."""
    return num_frames if ready >= num_frames else 0


class TokensOnly:
    """A method that only chooses the tokens entering the LLM (no attention glue)."""

    name = ""
    shares_prefix = True
    compacts_in_decode = False
    splits_rows = False
    row_scope = whole_batch_only
    needs_vision_signals = False
    record = False

    def __init__(self, options: MethodOptions, model: Any = None) -> None:
        self.options = options
        self.figures: dict[str, Any] = {}
        self.warnings: list[str] = []

    def compaction(self) -> Compaction | None:
        return None

    def stable_frames(self, ready: int, num_frames: int) -> int:
        return all_frames_stable(ready, num_frames)

    def dropped_kv(self) -> tuple[int, int] | None:
        return None

    @contextmanager
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[None]:
        yield

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        return dict(self.figures)


MethodFactory = Callable[[MethodOptions, Any], CompressionMethod]
_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Class decorator: make a method buildable by ``name`` (called as ``cls(options, model)``)."""

    def add(factory: MethodFactory) -> MethodFactory:
        _REGISTRY[name] = factory
        return factory

    return add


def registered_methods() -> list[str]:
    """Names of every method, in the order of ``config.METHODS`` (others after them)."""
    _load_all()
    order = {name: i for i, name in enumerate(METHODS)}
    return sorted(_REGISTRY, key=lambda name: order.get(name, len(order)))


def build_method(options: MethodOptions, model: Any, num_layers: int) -> CompressionMethod:
    """The method named by ``options.method`` for ``model``, checked against its ``num_layers``."""
    _load_all()
    factory = _REGISTRY.get(options.method)
    if factory is None:
        raise ConfigError(f"method must be one of {', '.join(registered_methods())}, got '{options.method}'")
    options.check_against_model(num_layers)
    return factory(options, model)


def _load_all() -> None:
    """Import every method module (each registers itself)."""
    import importlib

    for module in ("full", "dycoke", "fastv", "prumerge", "controls"):
        importlib.import_module(f"dycoke.methods.{module}")
