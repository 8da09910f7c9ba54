"""The vision encoder stage: (F, 3, H, W) pixels -> the projected, pooled tokens of every frame.

The computation is the model's own ``get_video_features`` (SigLIP tower, the selected hidden state,
the projector, 2x bilinear pooling of each frame's patch grid), run from its modules with two memory
layouts chosen for speed; the values are the same (tested against ``get_video_features``):

- the pixels go in channels-last, so the patch embedding's output, once flattened, is an ordinary
  contiguous (F, N, C) tensor. From the NCHW layout it is a transposed view, and the tower's residual
  stream keeps that layout through every layer: each residual add and layer norm then runs as a
  strided copy (about 20 of the 108 ms for 32 frames of the 7B model, H200);
- the pooling interpolates the (F, h, w, D) projected grid through its channels-last view instead of
  copying it to (F, D, h, w) first: PyTorch's NCHW bilinear kernel took 45 ms of those 108 ms on a
  batch of 32 x 3584 channels, its NHWC kernel well under one
  (``benchmarks/profile_vision.py``).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from dycoke.methods.base import VisionSignals
from dycoke.sdpa_choice import without_cudnn_attention


def pool_frame_grid(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(F, grid*grid, D) patch features -> (F, ceil(grid/2)**2, D), bilinear as LLaVA-OV's
    ``apply_pooling`` (``align_corners=False``), interpolating the grid's channels-last view."""
    frames, _, dim = features.shape
    side = math.ceil(grid / 2)
    channels_last = features.reshape(frames, grid, grid, dim).permute(0, 3, 1, 2)  # (F, D, g, g) view, NHWC in memory
    pooled = torch.nn.functional.interpolate(channels_last, size=[side, side], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(frames, side * side, dim)


def _tower_features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) pixels -> (F, N, C) hidden states of the layer(s) the config selects."""
    config = model.config
    inner = model.model
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    out = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    if isinstance(layer, int):
        selected = out.hidden_states[layer]
    else:
        selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
    if config.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return selected


def encode_frames(
    model: Any, pixels: torch.Tensor, tokens_per_frame: int, *, with_signals: bool = False
) -> tuple[torch.Tensor, torch.Tensor, VisionSignals | None]:
    """(F, 3, H, W) pixels -> ((F*T, D) frame tokens, (1, D) newline token, PruMerge's signals or None)."""
    from dycoke.methods.prumerge import vision_probe

    inner = model.model
    vision_config = model.config.vision_config
    grid = vision_config.image_size // vision_config.patch_size
    with vision_probe(model) if with_signals else nullcontext() as probe, without_cudnn_attention():
        selected = _tower_features(model, pixels)
    projected = inner.multi_modal_projector(selected)  # (F, grid*grid, D)
    tokens = pool_frame_grid(projected, grid)
    if tokens.shape[1] != tokens_per_frame:
        raise ValueError(f"the encoder gave {tokens.shape[1]} tokens per frame, expected {tokens_per_frame}")
    signals = None
    if probe is not None:
        assert probe.scores is not None and probe.keys is not None
        signals = VisionSignals(
            scores=pool_frame_grid(probe.scores.float().unsqueeze(-1), grid).squeeze(-1),
            keys=pool_frame_grid(probe.keys.float(), grid),
        )
    newline = inner.image_newline.reshape(1, -1).to(tokens.device, tokens.dtype)
    return tokens.reshape(-1, tokens.shape[-1]), newline, signals
