"""Equal-budget controls: ``random`` (a seeded choice of tokens) and ``uniform`` (fewer frames, whole).

Both keep, by default, as many tokens as DyCoke's merging would (``dycoke/compress/budget.py`` holds
the selection math).
"""

from __future__ import annotations

import torch

from dycoke.compress.budget import random_token_indices, uniform_frame_indices
from dycoke.config import MethodOptions
from dycoke.methods.base import CompressedVisual, TokensOnly, VisionSignals, register_method
from dycoke.methods.dycoke import merged_token_count


def budget_count(options: MethodOptions, num_frames: int, tokens_per_frame: int) -> int:
    """Frame tokens an equal-budget control keeps (newline excluded): ``budget_tokens - 1``, or
    ``budget_ratio`` of the frame tokens, or by default as many as DyCoke's merging keeps."""
    total = num_frames * tokens_per_frame
    if options.budget_tokens is not None:
        return min(total, options.budget_tokens - 1)
    if options.budget_ratio is not None:
        return min(total, max(1, round(options.budget_ratio * total)))
    return merged_token_count(options, num_frames, tokens_per_frame)


def raster_selection(
    features: torch.Tensor, flat: torch.Tensor, num_frames: int, tokens_per_frame: int
) -> CompressedVisual:
    """The tokens at ascending frame-major indices ``flat`` ((N,) long, on the CPU) of (F*T, D) ``features``."""
    frame = flat // tokens_per_frame
    return CompressedVisual(
        tokens=features.index_select(0, flat.to(features.device)),
        per_frame=torch.bincount(frame, minlength=num_frames).tolist(),
        frame_index=frame,
        patch_index=flat % tokens_per_frame,
    )


@register_method("random")
class RandomTokens(TokensOnly):
    """Equal-budget control: a seeded uniform choice of visual tokens, in raster order."""

    name = "random"

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        count = budget_count(self.options, num_frames, tokens_per_frame)
        chosen = random_token_indices(num_frames * tokens_per_frame, count, self.options.budget_seed)
        self.figures = {"budget_tokens": count + 1, "budget_seed": self.options.budget_seed}
        return raster_selection(features, chosen, num_frames, tokens_per_frame)


@register_method("uniform")
class UniformFrames(TokensOnly):
    """Equal-budget control: fewer frames, evenly spaced among the sampled ones, every token of each."""

    name = "uniform"

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        count = budget_count(self.options, num_frames, tokens_per_frame)
        frames = uniform_frame_indices(num_frames, tokens_per_frame, count)
        self.figures = {"budget_tokens": count + 1, "frames_kept": frames}
        t = tokens_per_frame
        flat = (torch.tensor(frames).unsqueeze(1) * t + torch.arange(t)).reshape(-1)
        return raster_selection(features, flat, num_frames, t)
