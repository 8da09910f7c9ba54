"""The one place that knows transformers' attention-function extension point.

Methods that act inside the language model's attention (DyCoke's decode-time pruning, FastV, the
static decoder's fused GQA step, PruMerge's vision probe) register an attention function under their
own name in both ``AttentionInterface`` and ``AttentionMaskInterface`` (without the mask registry
entry, padding masks would be dropped) and install it for a block with ``installed_attention``: it
hands the block's state to the function through a context variable and always restores the previous
implementation. Everything here behaves exactly like SDPA unless a session says otherwise.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right

from dycoke.switches import switch
from dycoke.transformers_index import seed_model_index

seed_model_index()  # before transformers' model code first imports (this module is where our imports of it start)

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402, F401 (for dycoke.decoding.fused)

# after the seed too: importing the kernels imports dycoke.decoding, which imports transformers
from dycoke.decoding.kernels import split_attention, split_attention_applies  # noqa: E402

AttentionFunction = Callable[..., tuple[torch.Tensor, Any]]

CONTINUATION_ATTENTION_ENV = "DYCOKE_CONTINUATION_ATTENTION"


def register_attention(name: str, function: AttentionFunction) -> None:
    """Register ``function`` as attention implementation ``name`` (with SDPA's mask builder)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def language_model_of(model: Any) -> Any:
    """The decoder of a ``LlavaOnevisionForConditionalGeneration`` (the vision tower keeps its attention)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model


@contextmanager
def installed_attention(
    module: Any, name: str, variable: contextvars.ContextVar[Any] | None, session: Any, what: str
) -> Iterator[None]:
    """For the block: ``session`` in ``variable`` (an attention function that needs no state: None)
    and ``module`` on the registered attention ``name``.

    ``module`` must run SDPA (or already ``name``); both are restored afterwards, whatever happens.
    """
    previous = module.config._attn_implementation
    if previous not in ("sdpa", name):
        raise ValueError(f"{what} builds on SDPA attention, the model uses '{previous}'")
    token = variable.set(session) if variable is not None else None
    module.set_attn_implementation(name)
    try:
        yield
    finally:
        module.set_attn_implementation(previous)
        if variable is not None and token is not None:
            variable.reset(token)


def attention_scaling(query: torch.Tensor, kwargs: dict[str, Any]) -> float:
    """The softmax scale an attention function was called with (transformers passes ``scaling``), else
    SDPA's default 1/sqrt(d) for (..., d) ``query``."""
    return float(kwargs.get("scaling") or query.shape[-1] ** -0.5)


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, ..., S) boolean "may attend" -> (B, 1, 1, S) additive bias: 0 or -inf, in ``dtype``.

    Its storage is padded to 16 keys so that SDPA's fused kernel takes it without an aligning copy.
    """
    b, s = allowed.shape[0], allowed.shape[-1]
    storage = torch.zeros(b, 1, 1, s + (-s) % 16, dtype=dtype, device=allowed.device)
    return storage[..., :s].masked_fill_(~allowed.reshape(b, 1, 1, s), float("-inf"))


def masked_decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, None]:
    """One new query per sample attending through a mask; grouped K/V heads are never repeated.

    An additive bias in bf16/fp16 on CUDA goes to ``kernels.split_attention`` (split over the slots, one
    compiled kernel pair for every cache length; ``DYCOKE_DECODE_ATTENTION=sdpa`` keeps SDPA), whose
    steady time is SDPA's or better at one row (H200: ``split-attention-h200.json``) and which builds no
    per-length plan, where SDPA on Hopper takes cuDNN and plans anew for each length (42-48 ms). Elsewhere,
    SDPA with ``enable_gqa`` and an additive, 16-aligned bias runs in one fused kernel about as fast as
    the unmasked call (H100, 7B shape, 3162 keys: 25.9 us vs 23.3 us; a boolean mask takes 53.5 us and
    laying query groups out as rows 68 us: benchmarks/results/micro-decode-attention-h100.txt).

    Shapes: query (B, Hq, 1, d); key/value (B, Hkv, S, d); mask (B, 1, 1, S), additive or boolean.
    Returns (B, 1, Hq, d), the layout transformers' attention functions return.
    """
    if mask.is_floating_point() and split_attention_applies(query, key, value, mask):
        return split_attention(query, key, value, mask, scaling or query.shape[-1] ** -0.5), None
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2), None


def continuation_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scaling: float | None
) -> tuple[torch.Tensor, None]:
    """Several new queries per row continuing a cache, through a mask, without repeating K/V heads.

    The ``G = Hq / Hkv`` query heads that share a K/V head become ``G * q`` query rows of that head,
    so one fused kernel reads each row's cache once. transformers' SDPA path copies the grouped K/V
    heads G times in every layer whenever a mask is given (a batch's padded questions after a shared
    prefix): 7x the cache per layer for the 7B model.

    Shapes: query (B, Hq, q, d); key/value (B, Hkv, S, d); ``bias`` (B, 1, G*q, S) additive, from
    ``grouped_rows_bias``. Returns (B, q, Hq, d), the layout transformers' attention functions return.
    """
    b, heads, q, d = query.shape
    groups = key.shape[1]
    rows = query.reshape(b, groups, heads // groups * q, d)  # head h = kv head h // G, then its q queries
    out = torch.nn.functional.scaled_dot_product_attention(rows, key, value, attn_mask=bias, scale=scaling)
    return out.reshape(b, heads, q, d).transpose(1, 2), None


def grouped_rows_bias(attention_mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, q, S) boolean mask -> (B, 1, groups*q, S) additive bias (0 or -inf): the mask repeated for
    each query head of a group, in ``continuation_attention``'s row order; storage padded to 16 keys."""
    b, _, q, s = attention_mask.shape
    storage = torch.zeros(b, 1, groups * q, s + (-s) % 16, dtype=dtype, device=attention_mask.device)
    allowed = attention_mask.to(torch.bool).expand(b, groups, q, s).reshape(b, 1, groups * q, s)
    return storage[..., :s].masked_fill_(~allowed, float("-inf"))


def take_slots(tensor: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S, d) keys or values -> (B, Hkv, S', d): the entries at (B, S') ``slots`` of each row."""
    index = slots.to(tensor.device)[:, None, :, None]
    return tensor.gather(2, index.expand(-1, tensor.shape[1], -1, tensor.shape[3]))


def compacted_key_slots(slots: torch.Tensor, prompt_length: int, kv_length: int) -> torch.Tensor:
    """The cache slot each entry of a compacted layer stands for: the (B, S') prompt ``slots`` it kept,
    then every slot from ``prompt_length`` on; (B, kv_length)."""
    b, kept = slots.shape
    later = torch.arange(prompt_length, prompt_length + kv_length - kept, device=slots.device)
    return torch.cat([slots, later.expand(b, -1)], dim=1)


def mask_at_slots(mask: torch.Tensor, key_slots: torch.Tensor) -> torch.Tensor:
    """(B, 1, q, S_all) boolean mask over every slot -> (B, 1, q, S'') at (B, S'') ``key_slots``."""
    index = key_slots.to(mask.device)[:, None, None, :]
    return mask.to(torch.bool).gather(3, index.expand(-1, mask.shape[1], mask.shape[2], -1))


def compacted_mask(
    slots: torch.Tensor, prompt_length: int, attention_mask: torch.Tensor | None, query: torch.Tensor, kv_length: int
) -> torch.Tensor | None:
    """The mask of a layer whose cache holds only ``slots`` of the prompt, then every later token.

    ``slots`` (B, S') are the prompt slots still stored; ``attention_mask`` is the model's
    (B, 1, q, S_all) boolean mask over every slot, or None (causal, no padding). Returns
    (B, 1, q, kv_length) boolean, or None where nothing is hidden (one query, no padding).
    """
    key_slots = compacted_key_slots(slots.to(query.device), prompt_length, kv_length)
    b, kept = slots.shape
    q_len = query.shape[2]
    if attention_mask is not None:
        return mask_at_slots(attention_mask, key_slots)
    if q_len > 1:
        total = prompt_length + kv_length - kept
        query_slots = torch.arange(total - q_len, total, device=query.device)
        return (key_slots[:, None, None, :] <= query_slots[None, None, :, None]).expand(b, 1, q_len, kv_length)
    return None


# -- a prompt prefilled chunk by chunk ------------------------------------------------------------

CHUNK_PREFILL_ATTENTION = "dycoke_chunk_prefill"


def chunk_prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One chunk of an unpadded prompt after the chunks already cached: each query sees the cache and
    the chunk up to itself (causal, aligned at the bottom right, ``torch.nn.attention.bias
    .causal_lower_right``, which flash attention runs as is), grouped K/V heads never repeated.

    transformers would build a (q, S) boolean mask for every chunk and repeat the K/V heads for it. No
    mask is built for this implementation (its mask function returns None). Shapes: query (1, Hq, q,
    d); key/value (1, Hkv, S, d), S >= q. Returns (1, q, Hq, d)."""
    q, s = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    scale = attention_scaling(query, kwargs)
    if q == s:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(q, s), scale=scale, enable_gqa=gqa
        )
    return out.transpose(1, 2), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


AttentionInterface.register(CHUNK_PREFILL_ATTENTION, chunk_prefill_attention)
AttentionMaskInterface.register(CHUNK_PREFILL_ATTENTION, _no_mask)


@contextmanager
def chunked_prefill(model: Any) -> Iterator[None]:
    """The language model's attention is ``chunk_prefill_attention`` for the block."""
    language_model = language_model_of(model)
    with installed_attention(language_model, CHUNK_PREFILL_ATTENTION, None, None, "chunked prefill"):
        yield


# -- decode steps on a static cache ---------------------------------------------------------------

DECODE_ATTENTION = "dycoke_decode"


@dataclass
class DecodeSession:
    """Additive biases built from the model's boolean mask, one per (device, key length, query length)
    and forward: each decode step's, and a masked prefill's that continues the cache.

    On a static cache every decode step carries a mask (the empty slots), and transformers' SDPA path
    then repeats the grouped K/V heads in every layer (a copy of the whole cache per layer and step).
    With an additive bias and ``enable_gqa`` one fused kernel reads the cache once. The bias is built
    at layer 0 of each step (or the first layer on a device) and shared by the later layers.

    ``compacted`` (set by a decoder whose later layers store fewer slots, as FastV and DP eviction do):
    the (B, S'') cache slots that such a layer's entries stand for, by which its bias is gathered from
    the full mask. ``prompt_length``: the slots the prompt fills (the first decode step's slot).
    """

    biases: dict[tuple[torch.device, int, int], torch.Tensor] = field(default_factory=dict)
    compacted: torch.Tensor | None = None
    prompt_length: int = 0

    def bias(
        self, attention_mask: torch.Tensor, query: torch.Tensor, layer: int | None, kv_length: int
    ) -> torch.Tensor:
        """A decode step's (B, 1, 1, kv_length) additive bias (gathered at a compacted layer's slots)."""

        def build() -> torch.Tensor:
            allowed = attention_mask.to(query.device, torch.bool)
            if allowed.shape[-1] != kv_length:
                assert self.compacted is not None and self.compacted.shape[-1] == kv_length
                allowed = mask_at_slots(allowed, self.compacted)
            return additive_bias(allowed, query.dtype)

        return self._per_forward(layer, (query.device, kv_length, 1), build)

    def continuation_bias(
        self, attention_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor, layer: int | None
    ) -> torch.Tensor:
        """A masked prefill's ``grouped_rows_bias`` (B, 1, G*q, S)."""
        groups = query.shape[1] // key.shape[1]
        return self._per_forward(
            layer,
            (query.device, int(key.shape[2]), int(query.shape[2])),
            lambda: grouped_rows_bias(attention_mask.to(query.device), groups, query.dtype),
        )

    def _per_forward(
        self, layer: int | None, key: tuple[torch.device, int, int], build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The bias under ``key`` (device, key length, query length), built at layer 0 (or a device's
        first layer) of each forward and shared by the later layers."""
        if layer == 0:
            self.biases.clear()
        bias = self.biases.get(key)
        if bias is None:
            bias = self.biases[key] = build()
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
    """SDPA, except inside ``static_decoding``: a masked one-query step runs as one fused GQA kernel
    with an additive bias, and on CUDA a masked prefill that continues a cache (a batch's padded
    questions after a shared prefix) as ``continuation_attention``. Shapes: query (B, Hq, q, d);
    key/value (B, Hkv, S, d); attention_mask None or (B, 1, q, S_mask) boolean (S_mask > S on a
    compacted layer)."""
    session = _DECODE.get()
    if session is None or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[2] != 1:
        if continuation_applies(query, key, attention_mask):
            bias = session.continuation_bias(attention_mask, query, key, getattr(module, "layer_idx", None))
            return continuation_attention(query, key, value, bias, kwargs.get("scaling"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bias = session.bias(attention_mask, query, getattr(module, "layer_idx", None), key.shape[2])
    return masked_decode_attention(query, key, value, bias, kwargs.get("scaling"))


def continuation_applies(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether ``continuation_attention`` takes this prefill: CUDA, grouped K/V heads, queries that
    continue a cache (more keys than queries: every query sees the cached part, so no row is fully
    masked), a (B, 1, q, S) mask over exactly these keys. ``DYCOKE_CONTINUATION_ATTENTION=0``: never."""
    return (
        query.is_cuda
        and query.shape[1] != key.shape[1]
        and key.shape[2] > query.shape[2]
        and attention_mask.dim() == 4
        and attention_mask.shape[1] == 1
        and attention_mask.shape[-1] == key.shape[2]
        and switch(CONTINUATION_ATTENTION_ENV, default=True)
    )


def decoding_session() -> DecodeSession | None:
    """The static decoder's session when one is active (a method's attention function defers to it)."""
    return _DECODE.get()


register_attention(DECODE_ATTENTION, decode_attention)


@contextmanager
def static_decoding(model: Any, session: DecodeSession | None = None) -> Iterator[DecodeSession]:
    """Decode steps on a static cache use ``decode_attention`` (directly, or through a method's
    attention function when one is installed: it calls ``decode_attention``) for the block."""
    language_model = language_model_of(model)
    session = session or DecodeSession()
    if language_model.config._attn_implementation != "sdpa":  # a method's function calls decode_attention
        token = _DECODE.set(session)
        try:
            yield session
        finally:
            _DECODE.reset(token)
        return
    with installed_attention(language_model, DECODE_ATTENTION, _DECODE, session, "the static decoder"):
        yield session
