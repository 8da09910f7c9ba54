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

from dycoke.compress.kv_prune import PruneState, keep_count
from dycoke.compress.ttm import MergeResult, temporal_token_merge_with_positions
from dycoke.config import MethodOptions
from dycoke.hooks import dynamic_pruning
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

    def decoding(self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int) -> Any:
        """A context manager installed around ``generate`` (attention hooks); ``num_visual`` counts
        the visual tokens placed at ``visual_start`` ((B,) per sample, or one int; newline included)."""
        ...

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        """Method-specific figures for the report of row ``sample`` of the batch, which generated
        ``generated`` tokens."""
        ...


class FullTokens:
    """No compression: every visual token, every layer, every step."""

    name = "full"

    def compress(self, features: torch.Tensor, num_frames: int, tokens_per_frame: int) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)

    @contextmanager
    def decoding(self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int) -> Iterator[None]:
        yield

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        return {}


class DyCoke:
    """DyCoke: temporal token merging at prefill (stage I) + dynamic KV pruning at decode (stage II).

    ``merge_ratio=0`` disables stage I (the tokens are untouched); ``prune_ratio=0`` disables stage II
    (no hook is installed), so K=0, P=0 is exactly the uncompressed path.
    """

    name = "dycoke"

    def __init__(self, options: MethodOptions, model: Any) -> None:
        self.options = options
        self.model = model
        self.state: PruneState | None = None
        self.merge: MergeResult | None = None
        self.num_visual = 0

    def compress(self, features: torch.Tensor, num_frames: int, tokens_per_frame: int) -> CompressedVisual:
        o = self.options
        merge = temporal_token_merge_with_positions(
            features,
            o.merge_ratio,
            tokens_per_frame,
            similarity_dtype=torch.float32 if o.similarity_fp32 else None,
            prune_last_window=o.prune_last_window,
            keep_odd_last_frame=o.keep_odd_last_frame,
        )
        self.merge = merge
        return CompressedVisual(
            tokens=merge.tokens,
            per_frame=list(merge.tokens_per_frame_kept),
            frame_index=merge.frame_index,
            patch_index=merge.patch_index,
        )

    @contextmanager
    def decoding(self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int) -> Iterator[None]:
        """Install stage II for one ``generate`` call; a fresh state per call (per sample)."""
        o = self.options
        self.num_visual = num_visual
        # The reference's off-by-one: the last merged token and the newline are never candidates.
        candidates = max(num_visual - 2, 0)
        keep = keep_count(candidates, o.prune_ratio)
        if o.prune_ratio == 0 or candidates == 0:
            self.state = None
            yield
            return
        device = self.model.get_input_embeddings().weight.device
        starts = torch.as_tensor(visual_start, device=device).reshape(-1)
        self.state = PruneState(
            starts=starts, num_candidates=candidates, keep=keep, threshold=o.gate_threshold, mode=o.gate_mode
        )
        with dynamic_pruning(self.model, self.state, o.prune_layer):
            yield

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        o = self.options
        out: dict[str, Any] = {
            "merge_ratio": o.merge_ratio,
            "prune_layer": o.prune_layer,
            "prune_ratio": o.prune_ratio,
            "gate_threshold": o.gate_threshold,
            "gate_mode": o.gate_mode,
            "paper_final_ratio": (1 - 3 * o.merge_ratio / 4) * (1 - o.prune_ratio),
        }
        state = self.state
        # A row that stopped early in a batch rides along for the remaining steps: count its own only.
        steps = min(state.steps, max(generated - 1, 0)) if state is not None else 0
        if state is not None and steps > 0:
            out["decode_steps"] = steps
            out["pruned_step_share"] = state.pruned_steps(steps)[sample].item() / steps
            out["candidates"] = state.num_candidates
            out["kept_when_pruned"] = state.keep
            attended = state.attended_sum(steps)[sample].item() / steps
            out["avg_candidates_attended_late_layers"] = attended
            out["avg_visual_attended_late_layers"] = attended + self.num_visual - state.num_candidates
        else:
            out["decode_steps"] = 0
            out["pruned_step_share"] = 0.0
        return out


def build_method(options: MethodOptions, loaded: LoadedModel) -> CompressionMethod:
    """The method named by ``options.method``, checked against the loaded model."""
    options.check_against_model(loaded.num_layers)
    if options.method == "dycoke":
        return DyCoke(options, loaded.model)
    return FullTokens()
