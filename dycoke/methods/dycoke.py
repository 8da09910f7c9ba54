"""DyCoke: temporal token merging at prefill (stage I, ``dycoke/compress/ttm.py``) and dynamic pruning
of the visual KV cache at every decode step (stage II, ``dycoke/compress/kv_prune.py``).

Stage II's glue is an attention function (registered under ``dycoke_dp``) that behaves exactly like
SDPA except during a decode step (one new query): at layer L-1 it also computes the new token's
head-averaged attention probabilities (that layer, that query only) and lets the ``PruneState``
choose a keep set; layers L.. then attend through an additive bias that hides the pruned visual
positions. ``--dp-evict`` (a deviation) removes, after the first decode step, the visual entries it
did not keep from the caches of layers >= L.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dycoke.attention import (
    additive_bias,
    attention_scaling,
    compacted_mask,
    decode_attention,
    decoding_session,
    installed_attention,
    language_model_of,
    masked_decode_attention,
    register_attention,
    take_slots,
)
from dycoke.compress.kv_prune import PruneState, head_mean_attention, keep_count, surviving_slots
from dycoke.compress.ttm import MergeResult, temporal_token_merge_with_positions, ttm_token_count
from dycoke.config import MethodOptions
from dycoke.decoding.dp_kernels import dp_kernels_apply, gather_later_layers, pruning_step
from dycoke.decoding.kernels import gathered_attention, split_attention_applies
from dycoke.methods.base import Compaction, CompressedVisual, VisionSignals, register_method
from dycoke.model import execution_device

ATTENTION_NAME = "dycoke_dp"
MIN_FRAMES_TO_MERGE = 5  # the reference's window step needs F >= 5 (it crashes below)


def merged_token_count(options: MethodOptions, num_frames: int, tokens_per_frame: int) -> int:
    """Frame tokens DyCoke's stage I keeps for ``num_frames`` frames (newline excluded): every token of
    a video of at most 4 frames, else ``ttm_token_count``."""
    if num_frames < MIN_FRAMES_TO_MERGE:
        return num_frames * tokens_per_frame
    return ttm_token_count(
        num_frames,
        tokens_per_frame,
        options.merge_ratio,
        prune_last_window=options.prune_last_window,
        keep_odd_last_frame=options.keep_odd_last_frame,
    )


@dataclass
class Eviction:
    """DP with eviction (a deviation from the paper, opt-in): the visual entries the first decode step
    did not keep are removed from the caches of layers >= L for good, so their memory is freed; later
    steps attend to the survivors. ``back_steps``/``back_tokens`` count, per row, the steps at which the
    paper's DP would have attended an evicted token again, and how many such tokens in all."""

    slots: torch.Tensor | None = None  # (B, S') prompt slots kept for layers >= L
    alive: torch.Tensor | None = None  # (B, n) candidates that survived
    prompt_length: int = 0
    back_steps: torch.Tensor | None = None  # (B,) long
    back_tokens: torch.Tensor | None = None  # (B,) long

    def observe(self, state: PruneState, kept: torch.Tensor, prompt_length: int) -> None:
        """Take a decode step's keep set: the first one decides what survives, later ones are counted.
        ``prompt_length``: the slots before this step's token."""
        if self.slots is None:
            b = kept.shape[0]
            self.prompt_length = prompt_length
            self.slots = surviving_slots(state.span, kept, prompt_length)
            self.alive = kept.clone()
            self.back_steps = torch.zeros(b, dtype=torch.long, device=kept.device)
            self.back_tokens = torch.zeros(b, dtype=torch.long, device=kept.device)
            return
        assert self.alive is not None and self.back_steps is not None and self.back_tokens is not None
        back = (kept & ~self.alive).sum(dim=-1)
        self.back_tokens += back
        self.back_steps += back > 0

    def take_rows(self, part: Eviction, start: int, batch: int) -> None:
        """Copy ``part`` (rows ``start..`` of a ``batch``-row generation, decoded on their own up to the
        first step) into this eviction's rows; its buffers are made at the first part."""
        if part.slots is None:
            return
        assert part.alive is not None and part.back_steps is not None and part.back_tokens is not None
        if self.slots is None:
            self.prompt_length = part.prompt_length
            self.slots = part.slots.new_empty((batch, part.slots.shape[1]))
            self.alive = part.alive.new_empty((batch, part.alive.shape[1]))
            self.back_steps = part.back_steps.new_zeros(batch)
            self.back_tokens = part.back_tokens.new_zeros(batch)
        assert self.alive is not None and self.back_steps is not None and self.back_tokens is not None
        stop = start + part.slots.shape[0]
        self.slots[start:stop] = part.slots
        self.alive[start:stop] = part.alive
        self.back_steps[start:stop] = part.back_steps
        self.back_tokens[start:stop] = part.back_tokens


@dataclass
class _RowCounts:
    """(B,) per-row DP counts over some number of decode steps, on the host."""

    pruned_steps: list[int]
    attended_sum: list[int]
    back_steps: list[int] | None  # with eviction only
    back_tokens: list[int] | None


@dataclass
class _HostCounts:
    """A batch's DP counts read back from the device once for all its rows' reports (a batch of 62 read
    them 62 times over before): the decode steps it ran, and every row's counts over the first n steps,
    per n asked for (a row that stopped early counts fewer)."""

    state: PruneState
    eviction: Eviction | None
    steps_run: int
    rows: dict[int, _RowCounts] = field(default_factory=dict)

    def over(self, steps: int) -> _RowCounts:
        if steps not in self.rows:
            ev = self.eviction
            back_steps = back_tokens = None
            if ev is not None and ev.back_steps is not None and ev.back_tokens is not None:
                back_steps, back_tokens = ev.back_steps.tolist(), ev.back_tokens.tolist()
            self.rows[steps] = _RowCounts(
                pruned_steps=self.state.pruned_steps(steps).tolist(),
                attended_sum=self.state.attended_sum(steps).tolist(),
                back_steps=back_steps,
                back_tokens=back_tokens,
            )
        return self.rows[steps]


class EvictingCache(DynamicCache):
    """A dynamic cache whose layers >= L drop the evicted entries once the first decode step chose them."""

    def __init__(self, eviction: Eviction, prune_layer: int) -> None:
        super().__init__()
        self.eviction = eviction
        self.prune_layer = prune_layer
        self.compacted: set[int] = set()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        slots = self.eviction.slots
        if layer_idx >= self.prune_layer and slots is not None and layer_idx not in self.compacted:
            layer: Any = self.layers[layer_idx]  # a DynamicLayer: keys/values (B, Hkv, S, d)
            layer.keys, layer.values = take_slots(layer.keys, slots), take_slots(layer.values, slots)
            self.compacted.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@dataclass
class PruneSession:
    """What the attention function needs during one generation.

    ``step_masks`` caches, for the current decode step, the bias of layers >= L per (device, incoming
    mask): it is built at the first layer >= L and reused by every later layer. ``later_bias`` is that
    bias when DP's kernels (``dycoke/decoding/dp_kernels.py``) made it at layer L-1.
    """

    state: PruneState
    prune_layer: int  # L: layers >= L attend to the keep set; layer L-1 chooses it
    keep: torch.Tensor | None = None  # (B, 1, 1, S) this step's keep mask
    eviction: Eviction | None = None
    step_masks: dict[tuple[torch.device, int], torch.Tensor] = field(default_factory=dict)
    later_bias: torch.Tensor | None = None  # (B, 1, 1, S) additive, from DP's kernels
    later_slots: tuple[torch.Tensor, torch.Tensor] | None = None  # the slots it lets them attend to

    def layer_mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
        """This step's additive mask for a layer >= L, on ``query``'s device and in its dtype.

        0 where a key may be attended, -inf at pruned visual positions (and wherever the incoming mask
        says no). Built once per step and device, then shared by every later layer.
        """
        cache_key = (query.device, id(attention_mask))
        bias = self.step_masks.get(cache_key)
        if bias is None:
            assert self.keep is not None
            allowed = self.keep.to(query.device)
            if attention_mask is not None:
                allowed = attention_mask.to(torch.bool) & allowed
            bias = additive_bias(allowed, query.dtype)
            self.step_masks[cache_key] = bias
        return bias


_ACTIVE: contextvars.ContextVar[PruneSession | None] = contextvars.ContextVar("dycoke_prune", default=None)


def dycoke_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention with DyCoke's decode-time pruning.

    Shapes: query (B, Hq, q, d); key/value (B, Hkv, S, d) (the whole cache; fewer entries on a layer
    >= L once eviction compacted it); attention_mask None or (B, 1, q, S_all) boolean.
    """
    session = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if session is None or layer is None or query.shape[2] != 1 or layer < session.prune_layer - 1:
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    state = session.state
    if layer == session.prune_layer - 1:
        scaling = attention_scaling(query, kwargs)
        fused = _pruning_step_on_kernels(session, query, key, value, attention_mask, scaling)
        if fused is not None:
            return fused, None
        probabilities = head_mean_attention(query, key, scaling, attention_mask)
        kept = state.update(state.visual_attention(probabilities.to(state.starts.device)))
        static = decoding_session()
        if session.eviction is not None:
            prompt = static.prompt_length if static is not None else key.shape[2] - 1
            session.eviction.observe(state, kept, prompt)
        session.keep = state.full_mask(key.shape[2]).reshape(query.shape[0], 1, 1, key.shape[2])
        session.step_masks.clear()
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    if session.later_bias is not None:
        bias = session.later_bias
        slots = session.later_slots
        if slots is not None and bias.device == query.device and split_attention_applies(query, key, value, bias):
            # only the slots this step lets the layer attend to are read
            return gathered_attention(query, key, value, slots, attention_scaling(query, kwargs), wait=False), None
        if bias.device != query.device:  # a layer on another device: one copy per device and step
            bias = session.step_masks.setdefault((query.device, -1), bias.to(query.device))
        return masked_decode_attention(query, key, value, bias, kwargs.get("scaling"))
    assert session.keep is not None
    if key.shape[2] != session.keep.shape[-1]:  # a layer that eviction compacted: the survivors only
        if decoding_session() is not None:
            return decode_attention(module, query, key, value, attention_mask, **kwargs)
        ev = session.eviction
        assert ev is not None and ev.slots is not None
        mask = compacted_mask(ev.slots, ev.prompt_length, attention_mask, query, key.shape[2])
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return masked_decode_attention(query, key, value, session.layer_mask(attention_mask, query), kwargs.get("scaling"))


def _pruning_step_on_kernels(
    session: PruneSession,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor | None:
    """Layer L-1 of a static decoder's step on DP's kernels (``dp_kernels.pruning_step``): its attention
    output (B, 1, Hq, d), ``session.later_bias`` set for layers >= L. None (``later_bias`` cleared) where
    they do not apply: outside a static decoder, with eviction, or ``dp_kernels_apply`` says no."""
    session.later_bias, session.later_slots = None, None
    static = decoding_session()
    if static is None or session.eviction is not None or attention_mask is None or attention_mask.dtype != torch.bool:
        return None
    bias = static.bias(attention_mask, query, session.prune_layer - 1, key.shape[2])
    if not dp_kernels_apply(session.state, query, key, value, bias):
        return None
    out, session.later_bias, session.later_slots = pruning_step(
        session.state, query, key, value, bias, scaling, list_slots=gather_later_layers(query.shape[0])
    )
    session.step_masks.clear()
    return out


register_attention(ATTENTION_NAME, dycoke_attention)


@contextmanager
def dynamic_pruning(
    model: Any, state: PruneState, prune_layer: int, eviction: Eviction | None = None
) -> Iterator[PruneSession]:
    """Install DyCoke's pruning attention on ``model``'s language model for the duration of the block.

    ``model`` is a ``LlavaOnevisionForConditionalGeneration``; only its language model switches
    attention implementation (the vision tower keeps its own).
    """
    session = PruneSession(state=state, prune_layer=prune_layer, eviction=eviction)
    with installed_attention(language_model_of(model), ATTENTION_NAME, _ACTIVE, session, "dynamic pruning"):
        yield session


@register_method("dycoke")
class DyCoke:
    """DyCoke: temporal token merging at prefill (stage I) + dynamic KV pruning at decode (stage II).

    ``merge_ratio=0`` disables stage I (the tokens are untouched); ``prune_ratio=0`` disables stage II
    (no glue is installed), so K=0, P=0 is exactly the uncompressed path.
    """

    name = "dycoke"
    shares_prefix = True
    needs_vision_signals = False

    def __init__(self, options: MethodOptions, model: Any) -> None:
        self.options = options
        self.model = model
        self.state: PruneState | None = None
        self._counts: _HostCounts | None = None
        self.eviction: Eviction | None = None
        self._session: PruneSession | None = None
        self.record = False  # keep every step's attention for a drawing
        self.merge: MergeResult | None = None
        self.num_visual = 0
        self.warnings: list[str] = []

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        """Stage I on (F*T, D) features; a video of at most 4 frames is kept whole (the reference's
        window step crashes there), with a warning."""
        o = self.options
        self.warnings = []
        if num_frames < MIN_FRAMES_TO_MERGE and o.merge_ratio > 0:
            self.warnings.append(
                f"DyCoke's token merging needs at least {MIN_FRAMES_TO_MERGE} frames, the video gives {num_frames}: "
                "its tokens are kept whole (decode-time pruning still applies)"
            )
            return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)
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

    def stable_frames(self, ready: int, num_frames: int) -> int:
        """TTM works inside windows of four frames (a pair, then frame 4w+2 against frame 4w; which
        windows re-prune depends on F only): every whole window of the ready frames is final."""
        if ready >= num_frames:
            return num_frames
        if num_frames < MIN_FRAMES_TO_MERGE or self.options.merge_ratio == 0:
            return ready  # kept whole
        return ready - ready % 4

    @contextmanager
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[DynamicCache | None]:
        """Install stage II for one generation; a fresh state per call (per sample)."""
        o = self.options
        self.num_visual = num_visual
        # The reference's off-by-one: the last merged token and the newline are never candidates.
        candidates = max(num_visual - 2, 0)
        keep = keep_count(candidates, o.prune_ratio)
        self.eviction = None
        if o.prune_ratio == 0 or candidates == 0:
            self.state = None
            yield None
            return
        device = execution_device(self.model)
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
            with dynamic_pruning(self.model, self.state, o.prune_layer):
                yield None
            return
        self.eviction = Eviction()
        with dynamic_pruning(self.model, self.state, o.prune_layer, self.eviction) as session:
            self._session = session
            try:
                yield EvictingCache(self.eviction, o.prune_layer)
            finally:
                self._session = None

    @property
    def compacts_in_decode(self) -> bool:
        """Eviction (``dp_evict``) drops entries once the first decode step chose them."""
        return self.options.dp_evict

    @property
    def splits_rows(self) -> bool:
        """With eviction, a batch may prefill and take its first step in groups of rows (``row_scope``):
        each group's cache is cut down before the next one's is made, which lowers the peak."""
        return self._session is not None  # set inside ``decoding`` with eviction only

    @contextmanager
    def row_scope(self, start: int, stop: int) -> Iterator[None]:
        """Within the block, DP decides for rows ``start..stop`` of the batch alone (the prefill and first
        decode step of that group); their keep sets and evicted slots land in the batch's state. Every
        group runs the same steps from the same start, in row order: the last group's step counter
        becomes the batch's."""
        whole, eviction, session = self.state, self.eviction, self._session
        assert whole is not None and eviction is not None and session is not None
        part, part_eviction = whole.rows(start, stop), Eviction()
        self.state, self.eviction = session.state, session.eviction = part, part_eviction
        try:
            yield
        finally:
            self.state, self.eviction = session.state, session.eviction = whole, eviction
            session.keep, session.later_bias, session.later_slots = None, None, None
            session.step_masks.clear()
        batch = int(whole.starts.shape[0])
        if stop == batch:
            whole.step.copy_(part.step)
        eviction.take_rows(part_eviction, start, batch)

    def compaction(self) -> Compaction | None:
        ev = self.eviction
        if ev is None or ev.slots is None:
            return None
        return Compaction(first_layer=self.options.prune_layer, slots=ev.slots, prompt_length=ev.prompt_length)

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
        counts = self._host_counts() if state is not None else None
        # A row that stopped early in a batch rides along for the remaining steps: count its own only.
        steps = min(counts.steps_run, max(generated - 1, 0)) if counts is not None else 0
        if state is not None and counts is not None and steps > 0:
            rows = counts.over(steps)
            out["decode_steps"] = steps
            out["pruned_steps"] = rows.pruned_steps[sample]
            out["pruned_step_share"] = out["pruned_steps"] / steps
            out["candidates"] = state.num_candidates
            out["kept_when_pruned"] = state.keep
            attended = rows.attended_sum[sample] / steps
            out["avg_candidates_attended_late_layers"] = attended
            out["avg_visual_attended_late_layers"] = attended + self.num_visual - state.num_candidates
            if rows.back_steps is not None and rows.back_tokens is not None:
                out["dp_evict"] = True
                out["evicted"] = state.num_candidates - state.keep
                later = max(steps - 1, 1)
                out["evicted_wanted_back_step_share"] = rows.back_steps[sample] / later
                out["evicted_wanted_back_avg_tokens"] = rows.back_tokens[sample] / later
        else:
            out["decode_steps"] = 0
            out["pruned_steps"] = 0
            out["pruned_step_share"] = 0.0
        return out

    def _host_counts(self) -> _HostCounts:
        """The current batch's counts on the host (a new batch brings a new state)."""
        state = self.state
        assert state is not None
        if self._counts is None or self._counts.state is not state:
            self._counts = _HostCounts(state=state, eviction=self.eviction, steps_run=state.steps)
        return self._counts
