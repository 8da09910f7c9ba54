"""FastV (Chen et al., ECCV 2024): the last prompt token's attention at layer K-1 ranks the visual tokens;
layers >= K keep only the top share of them, in prefill and in every decode step.

The ranking math is ``dycoke/compress/fastv.py``. The glue: an attention function that ranks at layer
K-1 during prefill and masks layers >= K, and a cache that stores, for layers >= K, only the kept
prompt entries (their memory is never allocated). On the static decoder the compacted layers are
static layers of their own length (``dycoke/decoding/static.py``).
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
    attention_scaling,
    compacted_mask,
    decode_attention,
    decoding_session,
    installed_attention,
    language_model_of,
    register_attention,
    take_slots,
)
from dycoke.compress.fastv import fastv_keep_count, kept_slots
from dycoke.compress.kv_prune import head_mean_attention
from dycoke.config import MethodOptions
from dycoke.methods.base import (
    Compaction,
    CompressedVisual,
    VisionSignals,
    all_frames_stable,
    register_method,
    whole_batch_only,
)
from dycoke.model import execution_device

FASTV_ATTENTION = "dycoke_fastv"


@dataclass
class FastVSession:
    """What FastV's attention function and cache share during one generation.

    ``slots`` is set at layer K-1 of the prefill: the (B, S') prompt slots kept from layer K on. The
    cache then stores only those entries for layers >= K, and the attention function maps every
    key it sees there back to its slot to build the mask.
    """

    layer: int  # K
    starts: torch.Tensor  # (B,) first visual slot per row
    num_visual: int
    keep: int
    slots: torch.Tensor | None = None
    prompt_length: int = 0
    step_masks: dict[tuple[torch.device, int, int], torch.Tensor | None] = field(default_factory=dict)

    def select(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> None:
        """Rank the visual tokens by the last prompt token's head-mean attention (layer K-1, prefill)."""
        last_mask = None if mask is None else mask[:, :, -1:, :]
        probabilities = head_mean_attention(query[:, :, -1:], key, scaling, last_mask)
        starts = self.starts.to(probabilities.device)
        self.slots = kept_slots(probabilities, starts, self.num_visual, self.keep)
        self.prompt_length = key.shape[2]

    def layer_mask(
        self, attention_mask: torch.Tensor | None, query: torch.Tensor, kv_length: int
    ) -> torch.Tensor | None:
        """The mask of a layer >= K (``compacted_mask``), built once per step and shared by the layers."""
        key = (query.device, id(attention_mask), kv_length)
        if key not in self.step_masks:
            assert self.slots is not None
            mask = compacted_mask(self.slots, self.prompt_length, attention_mask, query, kv_length)
            self.step_masks = {key: mask}  # one entry: masks change every step, layers share them
        return self.step_masks[key]


_FASTV: contextvars.ContextVar[FastVSession | None] = contextvars.ContextVar("dycoke_fastv", default=None)


def fastv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention with FastV: layer K-1 ranks (prefill), layers >= K see the kept tokens only.

    Shapes: query (B, Hq, q, d); key/value (B, Hkv, S, d), at layers >= K only the kept entries
    (``FastVCache``); attention_mask None or (B, 1, q, S_all) boolean over every slot. On the static
    decoder a decode step goes to ``decode_attention``, which maps compacted layers itself.
    """
    session = _FASTV.get()
    layer = getattr(module, "layer_idx", None)
    if query.shape[2] == 1 and decoding_session() is not None:
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    if session is None or layer is None or layer < session.layer - 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer == session.layer - 1:
        if query.shape[2] > 1 and session.slots is None:
            scaling = attention_scaling(query, kwargs)
            session.select(query, key, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = session.layer_mask(attention_mask, query, key.shape[2])
    kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


register_attention(FASTV_ATTENTION, fastv_attention)


class FastVCache(DynamicCache):
    """A dynamic cache that stores, for layers >= K, only the prompt entries FastV keeps.

    Passed to ``generate`` like any cache (the extension point for custom caches); layers < K and every
    generated token are stored as usual.
    """

    def __init__(self, session: FastVSession) -> None:
        super().__init__()
        self.session = session

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        slots = self.session.slots
        if layer_idx >= self.session.layer and key_states.shape[2] > 1 and slots is not None:
            key_states, value_states = take_slots(key_states, slots), take_slots(value_states, slots)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@contextmanager
def fastv_pruning(model: Any, session: FastVSession) -> Iterator[FastVCache]:
    """Install FastV's attention on ``model``'s language model; yields the cache to prefill into."""
    with installed_attention(language_model_of(model), FASTV_ATTENTION, _FASTV, session, "FastV"):
        yield FastVCache(session)


@register_method("fastv")
class FastV:
    """FastV: the last prompt token's attention at layer K-1 keeps the top share of visual tokens for
    layers >= K, in prefill and decoding. Every visual token enters the LLM; the selection depends on
    the question, so no prefix is shared between questions."""

    name = "fastv"
    shares_prefix = False
    compacts_in_decode = False  # at prefill
    splits_rows = False
    row_scope = whole_batch_only
    needs_vision_signals = False
    record = False

    def __init__(self, options: MethodOptions, model: Any) -> None:
        self.options = options
        self.model = model
        self.num_visual = 0
        self.keep = 0
        self.session: FastVSession | None = None
        self.warnings: list[str] = []

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        return CompressedVisual(tokens=features, per_frame=[tokens_per_frame] * num_frames)

    @contextmanager
    def decoding(
        self, *, visual_start: int | list[int] | torch.Tensor, num_visual: int, max_steps: int = 1024
    ) -> Iterator[FastVCache]:
        self.num_visual = num_visual
        self.keep = fastv_keep_count(num_visual, self.options.fastv_keep)
        device = execution_device(self.model)
        starts = torch.as_tensor(visual_start, device=device).reshape(-1)
        session = FastVSession(layer=self.options.fastv_layer, starts=starts, num_visual=num_visual, keep=self.keep)
        self.session = session
        with fastv_pruning(self.model, session) as cache:
            yield cache

    def stable_frames(self, ready: int, num_frames: int) -> int:
        return all_frames_stable(ready, num_frames)  # never prefilled before its question anyway

    def compaction(self) -> Compaction | None:
        session = self.session
        if session is None or session.slots is None:
            return None
        return Compaction(first_layer=session.layer, slots=session.slots, prompt_length=session.prompt_length)

    def dropped_kv(self) -> tuple[int, int] | None:
        return (self.options.fastv_layer, self.num_visual - self.keep) if self.num_visual else None

    def stats(self, generated: int, sample: int = 0) -> dict[str, Any]:
        return {
            "fastv_layer": self.options.fastv_layer,
            "fastv_keep": self.options.fastv_keep,
            "visual_kept_late_layers": self.keep,
            "fastv_retained_ratio": self.keep / self.num_visual if self.num_visual else 1.0,
        }
