"""The only code that knows transformers' attention-function signature.

DyCoke's decode-time pruning is a custom attention function registered under one name in both
``AttentionInterface`` and ``AttentionMaskInterface`` (the mask registry needs it too, or padding masks
would be dropped). It behaves exactly like SDPA except, during a decode step (one new query):
at layer L-1 it also computes the new token's head-averaged attention probabilities (only for that
layer and that query) and lets the ``PruneState`` choose a keep set; layers L.. then attend through a
boolean mask that hides the pruned visual positions. The state reaches the function through a
context variable set by ``dynamic_pruning``, which installs the function on the language model and
always restores the previous attention implementation.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dycoke.compress.kv_prune import PruneState, head_mean_attention

ATTENTION_NAME = "dycoke_dp"


@dataclass
class PruneSession:
    """What the attention function needs during one ``generate`` call.

    ``step_masks`` caches, for the current decode step, the mask of layers >= L per (device, incoming
    mask): it is built at the first layer >= L and reused by every later layer.
    """

    state: PruneState
    prune_layer: int  # L: layers >= L attend to the keep set; layer L-1 chooses it
    keep: torch.Tensor | None = None  # (B, 1, 1, S) this step's keep mask
    step_masks: dict[tuple[torch.device, int], torch.Tensor] = field(default_factory=dict)

    def layer_mask(self, attention_mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
        """This step's additive mask for a layer >= L, on ``query``'s device and in its dtype.

        0 where a key may be attended, -inf at pruned visual positions (and wherever the incoming mask
        says no). Built once per step and device, then shared by every later layer. A float bias runs
        in one fused SDPA kernel; its storage is padded to 16 keys so SDPA need not copy it to align.
        """
        cache_key = (query.device, id(attention_mask))
        bias = self.step_masks.get(cache_key)
        if bias is None:
            assert self.keep is not None
            allowed = self.keep.to(query.device)
            if attention_mask is not None:
                allowed = attention_mask.to(torch.bool) & allowed
            b, s = allowed.shape[0], allowed.shape[-1]
            storage = torch.zeros(b, 1, 1, s + (-s) % 16, dtype=query.dtype, device=query.device)
            bias = storage[..., :s].masked_fill_(~allowed.reshape(b, 1, 1, s), float("-inf"))
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

    Shapes: query (B, Hq, q, d); key/value (B, Hkv, S, d) (the whole cache); attention_mask None or
    (B, 1, q, S) boolean.
    """
    session = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if session is None or layer is None or query.shape[2] != 1 or layer < session.prune_layer - 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    state = session.state
    if layer == session.prune_layer - 1:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        probabilities = head_mean_attention(query, key, scaling, attention_mask)
        state.update(state.visual_attention(probabilities.to(state.starts.device)))
        session.keep = state.full_mask(key.shape[2]).reshape(query.shape[0], 1, 1, key.shape[2])
        session.step_masks.clear()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return masked_decode_attention(query, key, value, session.layer_mask(attention_mask, query), kwargs.get("scaling"))


def masked_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, None]:
    """One new query per sample attending through a mask; grouped K/V heads are never repeated.

    ``enable_gqa`` with an additive, 16-aligned bias runs in one fused kernel about as fast as the
    unmasked call (H100, 7B shape, 3162 keys: 25.9 us vs 23.3 us; a boolean mask takes 53.5 us and
    laying query groups out as rows 68 us: benchmarks/results/micro-decode-attention-h100.txt).

    Shapes: query (B, Hq, 1, d); key/value (B, Hkv, S, d); mask (B, 1, 1, S), additive or boolean.
    Returns (B, 1, Hq, d), the layout transformers' attention functions return.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, dycoke_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def dynamic_pruning(model: Any, state: PruneState, prune_layer: int) -> Iterator[PruneSession]:
    """Install DyCoke's pruning attention on ``model``'s language model for the duration of the block.

    ``model`` is a ``LlavaOnevisionForConditionalGeneration``; only its language model switches
    attention implementation (the vision tower keeps its own).
    """
    language_model = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model
    previous = language_model.config._attn_implementation
    if previous not in ("sdpa", ATTENTION_NAME):
        raise ValueError(f"dynamic pruning builds on SDPA attention, the model uses '{previous}'")
    session = PruneSession(state=state, prune_layer=prune_layer)
    token = _ACTIVE.set(session)
    language_model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield session
    finally:
        language_model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
