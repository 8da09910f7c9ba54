"""Compression methods as the pipeline sees them: what happens to the visual tokens before prefill,
and what is installed around generation.

Each method's math lives in ``dycoke/compress/`` (torch only); this module binds it to a loaded model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dycoke.config import MethodOptions
from dycoke.model import LoadedModel


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


class CompressionMethod(Protocol):
    """What every method provides to the pipeline."""

    name: str

    def compress(self, features: torch.Tensor, num_frames: int, tokens_per_frame: int) -> CompressedVisual:
        """(F*T, D) frame tokens -> the tokens the LLM sees."""
        ...

    def decoding(self, *, visual_start: int, num_visual: int) -> Any:
        """A context manager installed around ``generate`` (attention hooks); ``num_visual`` counts
        the visual tokens placed at ``visual_start`` (newline included)."""
        ...

    def stats(self, generated: int) -> dict[str, Any]:
        """Method-specific figures for the report, after generation."""
        ...


class FullTokens:
    """No compression: every visual token, every layer, every step."""

    name = "full"

    def compress(self, features: torch.Tensor, num_frames: int, tokens_per_frame: int) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)

    @contextmanager
    def decoding(self, *, visual_start: int, num_visual: int) -> Iterator[None]:
        yield

    def stats(self, generated: int) -> dict[str, Any]:
        return {}


def build_method(options: MethodOptions, loaded: LoadedModel) -> CompressionMethod:
    """The method named by ``options.method``, checked against the loaded model."""
    options.check_against_model(loaded.num_layers)
    return FullTokens()
