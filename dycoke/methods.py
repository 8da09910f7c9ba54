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

from dycoke.compress.budget import random_token_indices, uniform_frame_indices
from dycoke.compress.fastv import fastv_keep_count
from dycoke.compress.kv_prune import PruneState, keep_count
from dycoke.compress.ttm import MergeResult, temporal_token_merge_with_positions, ttm_token_count
from dycoke.config import MethodOptions
from dycoke.errors import ConfigError
from dycoke.hooks import EvictingCache, Eviction, FastVSession, dynamic_pruning, fastv_pruning
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


@dataclass
class VisionSignals:
    """What the vision tower saw, for methods that select inside it (PruMerge).

    Attributes:
        scores: (F, T) attention each pooled token receives (mean over heads and patch queries).
        keys: (F, T, C) keys of that layer (heads concatenated), pooled like the features.
    """

    scores: torch.Tensor
    keys: torch.Tensor


class CompressionMethod(Protocol):
    """What every method provides to the pipeline."""

    name: str
    shares_prefix: bool  # whether the prefilled system prompt + video can serve every question
    needs_vision_signals: bool
    record: bool  # keep what a drawing needs (set by the pipeline when asked)

    @property
    def shrinks_cache(self) -> bool:
        """Whether later layers store fewer keys than earlier ones (then only ``generate`` decodes)."""
        ...

    def dropped_kv(self) -> tuple[int, int] | None:
        """After generation: (first layer, entries per layer) the cache no longer stores, or None."""
        ...

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        """(F*T, D) frame tokens -> the tokens the LLM sees."""
        ...

    def decoding(self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024) -> Any:
        """A context manager installed around ``generate`` (attention hooks); ``num_visual`` counts
        the visual tokens placed at ``visual_start`` ((B,) per sample, or one int; newline included).
        It yields extra ``generate`` arguments (a dict) or None."""
        ...

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        """Method-specific figures for the report of row ``sample`` of the batch, which generated
        ``generated`` tokens."""
        ...


class _TokensOnly:
    """A method that only chooses the tokens entering the LLM (no hooks)."""

    name = ""
    shares_prefix = True
    needs_vision_signals = False
    record = False

    @property
    def shrinks_cache(self) -> bool:
        return False

    def dropped_kv(self) -> tuple[int, int] | None:
        return None

    def __init__(self, options: MethodOptions) -> None:
        self.options = options
        self.figures: dict[str, Any] = {}

    @contextmanager
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[None]:
        yield

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        return dict(self.figures)


class FullTokens(_TokensOnly):
    """No compression: every visual token, every layer, every step."""

    name = "full"

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)


class DyCoke:
    """DyCoke: temporal token merging at prefill (stage I) + dynamic KV pruning at decode (stage II).

    ``merge_ratio=0`` disables stage I (the tokens are untouched); ``prune_ratio=0`` disables stage II
    (no hook is installed), so K=0, P=0 is exactly the uncompressed path.
    """

    name = "dycoke"
    shares_prefix = True
    needs_vision_signals = False

    def __init__(self, options: MethodOptions, model: Any) -> None:
        self.options = options
        self.model = model
        self.state: PruneState | None = None
        self.eviction: Eviction | None = None
        self.record = False  # keep every step's attention for a drawing
        self.merge: MergeResult | None = None
        self.num_visual = 0

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
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
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[dict[str, Any] | None]:
        """Install stage II for one ``generate`` call; a fresh state per call (per sample)."""
        o = self.options
        self.num_visual = num_visual
        # The reference's off-by-one: the last merged token and the newline are never candidates.
        candidates = max(num_visual - 2, 0)
        keep = keep_count(candidates, o.prune_ratio)
        if o.prune_ratio == 0 or candidates == 0:
            self.state = None
            yield None
            return
        device = self.model.get_input_embeddings().weight.device
        starts = torch.as_tensor(visual_start, device=device).reshape(-1)
        self.state = PruneState(
            starts=starts,
            num_candidates=candidates,
            keep=keep,
            threshold=o.gate_threshold,
            mode=o.gate_mode,
            max_steps=max_steps,
            record_attention=self.record,
        )
        if not o.dp_evict:
            self.eviction = None
            with dynamic_pruning(self.model, self.state, o.prune_layer):
                yield None
            return
        from dycoke.prefix_cache import CACHE_ARGUMENT

        self.eviction = Eviction()
        with dynamic_pruning(self.model, self.state, o.prune_layer, self.eviction):
            yield {CACHE_ARGUMENT: EvictingCache(self.eviction, o.prune_layer)}

    @property
    def shrinks_cache(self) -> bool:
        return self.options.dp_evict

    def dropped_kv(self) -> tuple[int, int] | None:
        if self.eviction is None or self.eviction.slots is None or self.state is None:
            return None
        return self.options.prune_layer, self.state.num_candidates - self.state.keep

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
            ev = self.eviction
            if ev is not None and ev.back_steps is not None and ev.back_tokens is not None:
                out["dp_evict"] = True
                out["evicted"] = state.num_candidates - state.keep
                later = max(steps - 1, 1)
                out["evicted_wanted_back_step_share"] = ev.back_steps[sample].item() / later
                out["evicted_wanted_back_avg_tokens"] = ev.back_tokens[sample].item() / later
        else:
            out["decode_steps"] = 0
            out["pruned_step_share"] = 0.0
        return out


class FastV:
    """FastV: the last prompt token's attention at layer K-1 keeps the top share of visual tokens for
    layers >= K, in prefill and decoding (``dycoke/compress/fastv.py``). Every visual token enters the
    LLM; the selection depends on the question, so no prefix is shared between questions."""

    name = "fastv"
    shares_prefix = False
    needs_vision_signals = False
    record = False
    shrinks_cache = True

    def __init__(self, options: MethodOptions, model: Any) -> None:
        self.options = options
        self.model = model
        self.num_visual = 0
        self.keep = 0
        self.session: FastVSession | None = None

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)

    @contextmanager
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[dict[str, Any]]:
        from dycoke.prefix_cache import CACHE_ARGUMENT

        self.num_visual = num_visual
        self.keep = fastv_keep_count(num_visual, self.options.fastv_keep)
        device = self.model.get_input_embeddings().weight.device
        starts = torch.as_tensor(visual_start, device=device).reshape(-1)
        session = FastVSession(layer=self.options.fastv_layer, starts=starts, num_visual=num_visual, keep=self.keep)
        self.session = session
        with fastv_pruning(self.model, session) as cache:
            yield {CACHE_ARGUMENT: cache}

    def dropped_kv(self) -> tuple[int, int] | None:
        return (self.options.fastv_layer, self.num_visual - self.keep) if self.num_visual else None

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        return {
            "fastv_layer": self.options.fastv_layer,
            "fastv_keep": self.options.fastv_keep,
            "visual_kept_late_layers": self.keep,
            "fastv_retained_ratio": self.keep / self.num_visual if self.num_visual else 1.0,
        }


def budget_count(options: MethodOptions, num_frames: int, tokens_per_frame: int) -> int:
    """Frame tokens an equal-budget control keeps (newline excluded): ``budget_tokens - 1``, or
    ``budget_ratio`` of the frame tokens, or by default as many as DyCoke's merging keeps."""
    total = num_frames * tokens_per_frame
    if options.budget_tokens is not None:
        return min(total, options.budget_tokens - 1)
    if options.budget_ratio is not None:
        return min(total, max(1, round(options.budget_ratio * total)))
    return ttm_token_count(
        num_frames,
        tokens_per_frame,
        options.merge_ratio,
        prune_last_window=options.prune_last_window,
        keep_odd_last_frame=options.keep_odd_last_frame,
    )


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


class RandomTokens(_TokensOnly):
    """Equal-budget control: a seeded uniform choice of visual tokens, in raster order."""

    name = "random"

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        count = budget_count(self.options, num_frames, tokens_per_frame)
        chosen = random_token_indices(num_frames * tokens_per_frame, count, self.options.budget_seed)
        self.figures = {"budget_tokens": count + 1, "budget_seed": self.options.budget_seed}
        return raster_selection(features, chosen, num_frames, tokens_per_frame)


class UniformFrames(_TokensOnly):
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


def build_method(options: MethodOptions, loaded: LoadedModel) -> CompressionMethod:
    """The method named by ``options.method``, checked against the loaded model."""
    options.check_against_model(loaded.num_layers)
    if options.method == "dycoke":
        return DyCoke(options, loaded.model)
    if options.method == "fastv":
        return FastV(options, loaded.model)
    if options.method == "random":
        return RandomTokens(options)
    if options.method == "uniform":
        return UniformFrames(options)
    if options.method == "prumerge":
        return PruMerge(options)
    return FullTokens(options)


class PruMerge(_TokensOnly):
    """LLaVA-PruMerge (+): per frame, the tokens whose vision-tower attention is an IQR outlier are kept
    and the others merged into them by key similarity (``dycoke/compress/prumerge.py``).

    Adaptation to SigLIP (no class token) and LLaVA-OneVision's pooled video tokens: the "class
    attention" is the attention each patch receives, averaged over heads and patch queries, in the vision
    layer that produces the selected features; scores and keys are pooled to the 14x14 grid with the
    model's own bilinear pooling, and selection and merging act on the projected, pooled tokens the LLM
    receives (the reference merges CLIP features before the projector).
    """

    name = "prumerge"
    needs_vision_signals = True

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        if vision is None:
            raise ConfigError("prumerge needs the vision tower's attention: prepare the video with it")
        from dycoke.compress.prumerge import prumerge

        t = tokens_per_frame
        result = prumerge(
            features.reshape(num_frames, t, -1),
            vision.scores.to(features.device),
            vision.keys.to(features.device),
            plus=self.options.prumerge_plus,
        )
        self.figures = {"prumerge_plus": self.options.prumerge_plus, "iqr_outlier_ratio": result.ratio}
        return CompressedVisual(
            tokens=result.tokens,
            per_frame=list(result.tokens_per_frame),
            frame_index=result.frame_index,
            patch_index=result.patch_index,
        )
