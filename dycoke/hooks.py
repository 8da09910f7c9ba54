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
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dycoke.compress.fastv import kept_slots
from dycoke.compress.kv_prune import PruneState, head_mean_attention, surviving_slots

ATTENTION_NAME = "dycoke_dp"


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, ..., S) boolean "may attend" -> (B, 1, 1, S) additive bias: 0 or -inf, in ``dtype``.

    Its storage is padded to 16 keys so that SDPA's fused kernel takes it without an aligning copy.
    """
    b, s = allowed.shape[0], allowed.shape[-1]
    storage = torch.zeros(b, 1, 1, s + (-s) % 16, dtype=dtype, device=allowed.device)
    return storage[..., :s].masked_fill_(~allowed.reshape(b, 1, 1, s), float("-inf"))


def language_model_of(model: Any) -> Any:
    """The decoder of a ``LlavaOnevisionForConditionalGeneration`` (the vision tower keeps its attention)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model


@contextmanager
def installed_attention(
    module: Any, name: str, variable: contextvars.ContextVar[Any], session: Any, what: str
) -> Iterator[None]:
    """For the block: ``session`` in ``variable`` and ``module`` on the registered attention ``name``.

    ``module`` must run SDPA (or already ``name``); both are restored afterwards, whatever happens.
    """
    previous = module.config._attn_implementation
    if previous not in ("sdpa", name):
        raise ValueError(f"{what} builds on SDPA attention, the model uses '{previous}'")
    token = variable.set(session)
    module.set_attn_implementation(name)
    try:
        yield
    finally:
        module.set_attn_implementation(previous)
        variable.reset(token)


@dataclass
class PruneSession:
    """What the attention function needs during one ``generate`` call.

    ``step_masks`` caches, for the current decode step, the mask of layers >= L per (device, incoming
    mask): it is built at the first layer >= L and reused by every later layer.
    """

    state: PruneState
    prune_layer: int  # L: layers >= L attend to the keep set; layer L-1 chooses it
    keep: torch.Tensor | None = None  # (B, 1, 1, S) this step's keep mask
    eviction: Eviction | None = None
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
            bias = additive_bias(allowed, query.dtype)
            self.step_masks[cache_key] = bias
        return bias


def compacted_mask(
    slots: torch.Tensor, prompt_length: int, attention_mask: torch.Tensor | None, query: torch.Tensor, kv_length: int
) -> torch.Tensor | None:
    """The mask of a layer whose cache holds only ``slots`` of the prompt, then every later token.

    ``slots`` (B, S') are the prompt slots still stored; ``attention_mask`` is the model's
    (B, 1, q, S_all) boolean mask over every slot, or None (causal, no padding). Returns
    (B, 1, q, kv_length) boolean, or None where nothing is hidden (one query, no padding).
    """
    slots = slots.to(query.device)
    b, kept = slots.shape
    later = torch.arange(prompt_length, prompt_length + kv_length - kept, device=query.device)
    key_slots = torch.cat([slots, later.expand(b, -1)], dim=1)  # (B, kv_length)
    q_len = query.shape[2]
    if attention_mask is not None:
        index = key_slots[:, None, None, :].expand(-1, attention_mask.shape[1], attention_mask.shape[2], -1)
        return attention_mask.to(torch.bool).gather(3, index)
    if q_len > 1:
        total = prompt_length + kv_length - kept
        query_slots = torch.arange(total - q_len, total, device=query.device)
        return (key_slots[:, None, None, :] <= query_slots[None, None, :, None]).expand(b, 1, q_len, kv_length)
    return None


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

    def observe(self, state: PruneState, kept: torch.Tensor, kv_length: int) -> None:
        """Take a decode step's keep set: the first one decides what survives, later ones are counted."""
        if self.slots is None:
            b = kept.shape[0]
            self.prompt_length = kv_length - 1  # the slots before this step's token
            self.slots = surviving_slots(state.span, kept, self.prompt_length)
            self.alive = kept.clone()
            self.back_steps = torch.zeros(b, dtype=torch.long, device=kept.device)
            self.back_tokens = torch.zeros(b, dtype=torch.long, device=kept.device)
            return
        assert self.alive is not None and self.back_steps is not None and self.back_tokens is not None
        back = (kept & ~self.alive).sum(dim=-1)
        self.back_tokens += back
        self.back_steps += back > 0


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
            keys = layer.keys
            index = slots.to(keys.device)[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            layer.keys, layer.values = keys.gather(2, index), layer.values.gather(2, index)
            self.compacted.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


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
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    state = session.state
    if layer == session.prune_layer - 1:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        probabilities = head_mean_attention(query, key, scaling, attention_mask)
        kept = state.update(state.visual_attention(probabilities.to(state.starts.device)))
        if session.eviction is not None:
            session.eviction.observe(state, kept, key.shape[2])
        else:
            session.keep = state.full_mask(key.shape[2]).reshape(query.shape[0], 1, 1, key.shape[2])
        session.step_masks.clear()
        return decode_attention(module, query, key, value, attention_mask, **kwargs)
    if session.eviction is not None:
        ev = session.eviction
        assert ev.slots is not None
        mask = compacted_mask(ev.slots, ev.prompt_length, attention_mask, query, key.shape[2])
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    return masked_decode_attention(query, key, value, session.layer_mask(attention_mask, query), kwargs.get("scaling"))


# -- decode steps on a static cache ---------------------------------------------------------------

DECODE_ATTENTION = "dycoke_decode"


@dataclass
class DecodeSession:
    """Per-step additive biases built from the model's boolean decode mask, one per device.

    On a static cache every decode step carries a mask (the empty slots), and transformers' SDPA path
    then repeats the grouped K/V heads in every layer (a copy of the whole cache per layer and step).
    With an additive bias and ``enable_gqa`` one fused kernel reads the cache once. The bias is built
    at layer 0 of each step (or the first layer on a device) and shared by the later layers.
    """

    biases: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def bias(self, attention_mask: torch.Tensor, query: torch.Tensor, layer: int | None) -> torch.Tensor:
        if layer == 0:
            self.biases.clear()
        bias = self.biases.get(query.device)
        if bias is None:
            bias = additive_bias(attention_mask.to(query.device, torch.bool), query.dtype)
            self.biases[query.device] = bias
        return bias


_DECODE: contextvars.ContextVar[DecodeSession | None] = contextvars.ContextVar("dycoke_decode", default=None)


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, except that a masked one-query step inside ``static_decoding`` runs as one fused GQA
    kernel with an additive bias. Shapes as ``dycoke_attention``."""
    session = _DECODE.get()
    if session is None or query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bias = session.bias(attention_mask, query, getattr(module, "layer_idx", None))
    return masked_decode_attention(query, key, value, bias, kwargs.get("scaling"))


@contextmanager
def static_decoding(model: Any) -> Iterator[DecodeSession]:
    """Decode steps on a static cache use ``decode_attention`` (directly, or through DP's function
    when DyCoke's pruning is installed) for the duration of the block."""
    language_model = language_model_of(model)
    session = DecodeSession()
    if language_model.config._attn_implementation == ATTENTION_NAME:  # DP's function calls decode_attention
        token = _DECODE.set(session)
        try:
            yield session
        finally:
            _DECODE.reset(token)
        return
    with installed_attention(language_model, DECODE_ATTENTION, _DECODE, session, "the static decoder"):
        yield session


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
AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)


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


# -- FastV -------------------------------------------------------------------------------------------

FASTV_ATTENTION = "dycoke_fastv"


@dataclass
class FastVSession:
    """What FastV's attention function and cache share during one ``generate`` call.

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
    (``FastVCache``); attention_mask None or (B, 1, q, S_all) boolean over every slot.
    """
    session = _FASTV.get()
    layer = getattr(module, "layer_idx", None)
    if session is None or layer is None or layer < session.layer - 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer == session.layer - 1:
        if query.shape[2] > 1 and session.slots is None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            session.select(query, key, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = session.layer_mask(attention_mask, query, key.shape[2])
    kwargs["is_causal"] = False
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(FASTV_ATTENTION, fastv_attention)
AttentionMaskInterface.register(FASTV_ATTENTION, sdpa_mask)


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
            index = slots.to(key_states.device)[:, None, :, None]
            index = index.expand(-1, key_states.shape[1], -1, key_states.shape[3])
            key_states, value_states = key_states.gather(2, index), value_states.gather(2, index)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@contextmanager
def fastv_pruning(model: Any, session: FastVSession) -> Iterator[FastVCache]:
    """Install FastV's attention on ``model``'s language model; yields the cache to give ``generate``."""
    with installed_attention(language_model_of(model), FASTV_ATTENTION, _FASTV, session, "FastV"):
        yield FastVCache(session)


# -- PruMerge: what the vision tower's selected layer attends to ----------------------------------

VISION_PROBE_ATTENTION = "dycoke_vision_probe"


@dataclass
class VisionProbe:
    """Captures, for one vision layer, the attention each patch receives and the layer's keys."""

    target: torch.nn.Module
    scores: torch.Tensor | None = None  # (F, N) mean over heads and queries
    keys: torch.Tensor | None = None  # (F, N, H*d)


_PROBE: contextvars.ContextVar[VisionProbe | None] = contextvars.ContextVar("dycoke_probe", default=None)


def vision_probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention that also records the probe's layer: probabilities one frame at a time, so that
    at most one (H, N, N) matrix exists at once. Shapes: query/key/value (F, H, N, d)."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    probe = _PROBE.get()
    if probe is not None and module is probe.target:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        received = []
        for frame in range(query.shape[0]):
            logits = torch.matmul(query[frame].float(), key[frame].float().transpose(-1, -2)) * scaling
            received.append(logits.softmax(dim=-1).mean(dim=(0, 1)))
        probe.scores = torch.stack(received)
        probe.keys = key.transpose(1, 2).reshape(key.shape[0], key.shape[2], -1)
    return out


AttentionInterface.register(VISION_PROBE_ATTENTION, vision_probe_attention)
AttentionMaskInterface.register(VISION_PROBE_ATTENTION, sdpa_mask)


@contextmanager
def vision_probe(model: Any) -> Iterator[VisionProbe]:
    """Record the attention of the vision layer whose output LLaVA-OneVision selects
    (``vision_feature_layer``, the last one in the released checkpoints) during the block."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"PruMerge needs one vision_feature_layer, the checkpoint selects {layer}")
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers  # 5.17 | 5.2x
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0] is the embeddings)
    index = layer - 1 if layer > 0 else len(layers) + layer
    probe = VisionProbe(target=layers[index].self_attn)
    with installed_attention(tower, VISION_PROBE_ATTENTION, _PROBE, probe, "PruMerge's probe"):
        yield probe
