"""The vision encoder stage: (F, 3, H, W) pixels -> the projected, pooled tokens of every frame."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from dycoke.methods.base import VisionSignals


def encode_frames(
    model: Any, pixels: torch.Tensor, tokens_per_frame: int, *, with_signals: bool = False
) -> tuple[torch.Tensor, torch.Tensor, VisionSignals | None]:
    """(F, 3, H, W) pixels -> ((F*T, D) frame tokens, (1, D) newline token, PruMerge's signals or None).

    transformers >= 5.2x appends the newline token to ``get_video_features``' output; older 5.x
    releases return the frame tokens alone and add ``image_newline`` in ``forward``.
    """
    from dycoke.methods.prumerge import vision_probe

    config = model.config
    with vision_probe(model) if with_signals else nullcontext() as probe:
        out = model.get_video_features(
            pixels.unsqueeze(0),  # named pixel_values_videos in 5.2x, pixel_values in 5.17: pass by position
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    tokens = tokens.reshape(-1, tokens.shape[-1])
    frame_tokens = pixels.shape[0] * tokens_per_frame
    signals = None
    if probe is not None:
        assert probe.scores is not None and probe.keys is not None
        pool = model.model.apply_pooling  # the model's own video pooling (bilinear, 27x27 -> 14x14)
        signals = VisionSignals(
            scores=pool(probe.scores.float().unsqueeze(-1)).squeeze(-1), keys=pool(probe.keys.float())
        )
    if tokens.shape[0] == frame_tokens + 1:
        return tokens[:-1], tokens[-1:], signals
    newline = model.model.image_newline.reshape(1, -1).to(tokens.device, tokens.dtype)
    return tokens, newline, signals
