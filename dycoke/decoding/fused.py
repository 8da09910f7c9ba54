"""One decode step of a Qwen2-family language model with fused projections and kernels.

The module-by-module step (``model(...)`` with transformers' Qwen2 layers) launches about 45 kernels
per layer for one token: three query/key/value projections, a seven-op RMSNorm twice, twenty-odd ops of
rotary embedding, the cache update, gate and up projections apart. Inside a CUDA graph their launch
cost is gone, but each still costs a few microseconds of GPU time, which at batch 1 is as much as the
weights' reading. This step computes the same thing with about 12 kernels per layer:

- the query, key and value projections as one GEMM (their weights concatenated once, the modules'
  own parameters becoming views of the concatenation: no extra memory, the prefill unchanged), and
  gate and up likewise;
- residual add + RMSNorm, rotary + cache write, SiLU * up as one kernel each (``kernels.py``: Triton on
  CUDA, the same arithmetic in torch elsewhere);
- attention through the attention function installed on the model (``decode_attention``, or a
  method's, e.g. DyCoke's dynamic pruning), called exactly as transformers' Qwen2 attention calls it;
- at batch 1 in bf16/fp16 on CUDA, the QKV, output, gate/up, down and LM-head projections as
  ``kernels.gemv`` (a Triton matrix-vector kernel: 2.8-4.4 TB/s where cuBLAS's one-row kernels reach
  2.2-3.8 on an H200; the down projection split over its long rows, SiLU * up read into it, its slices
  added by the next RMSNorm kernel); ``DYCOKE_GEMV=cublas`` keeps cuBLAS.

Numerically: on the CPU (torch arithmetic) it gives the module path's tokens (tested for every
method); on a GPU the RMSNorm and SiLU kernels matched transformers' bf16 results bit for bit (H200),
the rotary kernel since it rounds with integer operations (Triton's interpreter; see ``kernels.py``),
and the wider GEMMs and the GEMV kernel may sum in another order.
``fused_decoder_for`` returns None, and the caller keeps the module-by-module step, for any model this
step does not implement exactly (not Qwen2, a sliding window, a scaled RoPE, other activations).

Shapes: B rows, one token each; D hidden size; Hq / Hkv heads of size d; F the MLP's width; V vocab.
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from dycoke.attention import ALL_ATTENTION_FUNCTIONS, language_model_of
from dycoke.decoding.kernels import (
    DOWN_GEMV_CONFIG,
    GEMV_CONFIG,
    add_rms_norm,
    gemv,
    rotary_to_cache,
    silu_mul,
    triton_available,
)

GEMV_ENV = "DYCOKE_GEMV"
"""``DYCOKE_GEMV=cublas`` keeps cuBLAS for the one-row projections (default: ``kernels.gemv``);
``DYCOKE_GEMV=cublas-down`` keeps it for the down projection only (SiLU * up, then cuBLAS)."""


def _gemv_config(weight: torch.Tensor) -> dict[str, int]:
    """Block sizes for ``kernels.gemv`` on an (N, K) weight, from ``benchmarks/micro_gemv.py`` (H200, 7B
    shapes): 8 rows per program, 4 below 16M elements (more programs for the small matrices)."""
    return {**GEMV_CONFIG, "block_n": 4 if weight.numel() < 16 * 2**20 else 8}


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) @ (N, K).T (+ bias) -> (B, N): ``kernels.gemv`` for one bf16/fp16 row on CUDA (it streams the
    weight at 2.8-4.4 TB/s on an H200 where cuBLAS's one-row kernels reach 2.2-3.8: micro_gemv.py),
    cuBLAS otherwise (more rows, float32, the CPU, or ``DYCOKE_GEMV=cublas``)."""
    if _gemv_applies(x, weight):
        return gemv(x, weight, bias, config=_gemv_config(weight))
    return torch.nn.functional.linear(x, weight, bias)


def _gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.shape[0] == 1
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.is_contiguous()
        and triton_available(x.device)
        and os.environ.get(GEMV_ENV, "triton") != "cublas"
    )


def _down(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MLP's output from its (B, 2F) gate/up projection: ``silu(gate) * up`` through the (D, F) down
    weight. At batch 1 on CUDA one split ``kernels.gemv`` (SiLU * up folded into its input) whose
    (P, 1, D) float32 slices the next ``add_rms_norm`` adds: one kernel where SiLU, cuBLAS's split-K GEMM
    and its reduction were three, and 3584 x 18944 read at a higher rate (``micro_gemv.py``). Otherwise
    (or ``DYCOKE_GEMV=cublas-down``) ``silu_mul`` and cuBLAS: (B, D)."""
    if _gemv_applies(gate_up, weight) and os.environ.get(GEMV_ENV) != "cublas-down":
        return gemv(gate_up, weight, silu_input=True, config=DOWN_GEMV_CONFIG)
    return torch.nn.functional.linear(silu_mul(gate_up), weight)


@dataclass
class _Layer:
    attention: Any  # the layer's Qwen2Attention module (its attention function reads layer_idx, scaling)
    qkv_weight: torch.Tensor  # ((Hq + 2 Hkv) d, D)
    qkv_bias: torch.Tensor | None  # ((Hq + 2 Hkv) d,)
    o_weight: torch.Tensor  # (D, Hq d)
    gate_up_weight: torch.Tensor  # (2F, D)
    down_weight: torch.Tensor  # (D, F)
    input_norm: torch.Tensor  # (D,)
    post_norm: torch.Tensor  # (D,)


def _unsupported(language_model: Any, lm_head: Any) -> str | None:
    """Why this step cannot stand in for ``language_model``'s own forward (None: it can)."""
    config = language_model.config
    if getattr(config, "model_type", None) != "qwen2":
        return f"model type {getattr(config, 'model_type', None)!r}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {config.hidden_act!r}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "sliding-window layers"
    rotary = getattr(language_model, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") != "default" or rotary.attention_scaling != 1.0:
        return "a scaled rotary embedding"
    if lm_head is None or getattr(lm_head, "bias", None) is not None:
        return "no plain language-model head"
    for layer in language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.o_proj.bias is not None or any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return "biases where Qwen2 has none"
        if (attn.k_proj.bias is None) != (attn.q_proj.bias is None) or (attn.v_proj.bias is None) != (
            attn.q_proj.bias is None
        ):
            return "biases on some projections only"
        if getattr(attn, "sliding_window", None):
            return "a sliding window"
    return None


def _fuse(modules: list[Any], name: str) -> torch.Tensor:
    """Concatenate the modules' ``name`` parameters (rows) and make each module's parameter a view of
    its rows of the result (its values, dtype and device unchanged). Idempotent."""
    parts = [getattr(m, name) for m in modules]
    first = parts[0]
    starts = itertools.accumulate((p.numel() for p in parts[:-1]), initial=first.storage_offset())
    if all(
        p.is_contiguous()
        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and p.storage_offset() == start
        for p, start in zip(parts, starts, strict=True)
    ):  # already consecutive rows of one tensor: fused before
        total = sum(p.shape[0] for p in parts)
        return first.detach().as_strided((total, *first.shape[1:]), first.stride(), first.storage_offset())
    with torch.no_grad():
        fused = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for module, part in zip(modules, parts, strict=True):
        rows = part.shape[0]
        setattr(module, name, torch.nn.Parameter(fused[start : start + rows], requires_grad=part.requires_grad))
        start += rows
    return fused


class FusedStep:
    """The decode step of one model (built once per model: ``fused_decoder_for``)."""

    def __init__(self, model: Any) -> None:
        language_model = language_model_of(model)
        config = language_model.config
        self.embed = language_model.embed_tokens
        self.rotary = language_model.rotary_emb
        self.norm = language_model.norm.weight
        self.eps = float(config.rms_norm_eps)
        self.lm_head = model.lm_head.weight
        self.hq = int(config.num_attention_heads)
        self.hkv = int(config.num_key_value_heads)
        self.config = config
        layers = []
        for layer in language_model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = [attn.q_proj, attn.k_proj, attn.v_proj]
            qkv = _fuse(projections, "weight")
            bias = _fuse(projections, "bias") if attn.q_proj.bias is not None else None
            gate_up = _fuse([mlp.gate_proj, mlp.up_proj], "weight")
            layers.append(
                _Layer(
                    attention=attn,
                    qkv_weight=qkv,
                    qkv_bias=bias,
                    o_weight=attn.o_proj.weight,
                    gate_up_weight=gate_up,
                    down_weight=mlp.down_proj.weight,
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                )
            )
        self.layers = layers

    def logits(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """(B, 1) tokens at (B, 1) positions, attending through the (B, 1, 1, L) boolean ``mask``, with
        each layer's key and value written at its static cache layer's next slot -> (B, V) logits."""
        b = token.shape[0]
        attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        hidden = self.embed(token)  # (B, 1, D)
        cos, sin = self.rotary(hidden, position)  # (B, 1, d) each, in the model's dtype
        cos, sin = cos.reshape(b, -1), sin.reshape(b, -1)
        hidden = hidden.reshape(b, -1)
        delta: torch.Tensor | None = None
        for layer in self.layers:
            hidden, x = add_rms_norm(hidden, delta, layer.input_norm, self.eps)
            qkv = _linear(x, layer.qkv_weight, layer.qkv_bias)  # (B, (Hq + 2 Hkv) d)
            static = cache.layers[layer.attention.layer_idx]
            query = rotary_to_cache(
                qkv, cos, sin, static.keys, static.values, static.cumulative_length.view(1), self.hq, self.hkv
            )
            static.cumulative_length.add_(1)
            out, _ = attend(
                layer.attention,
                query,
                static.keys,
                static.values,
                mask,
                dropout=0.0,
                scaling=layer.attention.scaling,
                sliding_window=None,
                position_ids=position,
            )
            attended = _linear(out.reshape(b, -1), layer.o_weight)
            hidden, x = add_rms_norm(hidden, attended, layer.post_norm, self.eps)
            delta = _down(_linear(x, layer.gate_up_weight), layer.down_weight)  # (B, D), or (P, 1, D) slices
        _, x = add_rms_norm(hidden, delta, self.norm, self.eps)
        return _linear(x, self.lm_head)


_STEPS: weakref.WeakKeyDictionary[Any, FusedStep | None] = weakref.WeakKeyDictionary()


def fused_decoder_for(model: Any) -> FusedStep | None:
    """The model's fused step, built on first use (None when the model is not one it implements)."""
    if model in _STEPS:
        return _STEPS[model]
    language_model = language_model_of(model)
    step = None if _unsupported(language_model, getattr(model, "lm_head", None)) else FusedStep(model)
    _STEPS[model] = step
    return step
