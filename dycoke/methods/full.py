"""``full``: no compression; every visual token, every layer, every step."""

from __future__ import annotations

import torch

from dycoke.methods.base import CompressedVisual, TokensOnly, VisionSignals, register_method


@register_method("full")
class FullTokens(TokensOnly):
    """No compression: every visual token, every layer, every step."""

    name = "full"

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)

    def stable_frames(self, ready: int, num_frames: int) -> int:
        return min(ready, num_frames)  # each frame's tokens are its own
