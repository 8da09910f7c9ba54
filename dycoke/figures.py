"""The figures of one answer: token counts, memory, and what compression saved (the paper's cost
model and exact KV-cache bytes from the model's shapes). Plain computation, no printing."""

from __future__ import annotations

from typing import Any

import torch

from dycoke.config import RunOptions
from dycoke.costs import LlmShape, dycoke_tflops, fastv_tflops, full_tflops, prefill_flops
from dycoke.methods.base import CompressionMethod
from dycoke.report import Memory, TokenCounts, kv_cache_bytes


def llm_shape(text_config: Any) -> LlmShape:
    return LlmShape(
        layers=int(text_config.num_hidden_layers),
        hidden=int(text_config.hidden_size),
        ffn=int(text_config.intermediate_size),
    )


def value_bytes(dtype: torch.dtype) -> int:
    """Bytes of one stored key or value element."""
    return torch.finfo(dtype).bits // 8


def stored_kv_bytes(method: CompressionMethod, text_config: Any, seq_len: int, element: int) -> int:
    """KV-cache bytes at the end of generation, less what the method dropped from later layers."""
    full = kv_cache_bytes(text_config, seq_len, element)
    dropped = method.dropped_kv()
    if dropped is None:
        return full
    first_layer, entries = dropped
    layers = int(text_config.num_hidden_layers)
    return full - kv_cache_bytes(text_config, entries, element) * (layers - first_layer) // layers


def token_counts(
    num_frames: int, tokens_per_frame: int, per_frame: list[int], prompt: int, generated: int
) -> TokenCounts:
    return TokenCounts(
        frames=num_frames,
        tokens_per_frame=tokens_per_frame,
        visual_per_frame=per_frame,
        visual=sum(per_frame) + 1,
        visual_uncompressed=num_frames * tokens_per_frame + 1,
        prompt=prompt,
        generated=generated,
    )


def memory_figures(
    method: CompressionMethod, text_config: Any, device: torch.device, dtype: torch.dtype, tokens: TokenCounts
) -> Memory:
    element = value_bytes(dtype)
    return Memory(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        kv_cache_bytes=stored_kv_bytes(method, text_config, tokens.prompt + max(tokens.generated - 1, 0), element),
    )


def compression_figures(
    method: CompressionMethod,
    options: RunOptions,
    text_config: Any,
    tokens: TokenCounts,
    memory: Memory,
    dtype: torch.dtype,
    sample: int = 0,
) -> dict[str, Any]:
    """Retained ratios; the paper's TFLOPs (prefill and in all) for this run vs every token; KV-cache
    bytes with every token vs stored, and read per decode step with and without DP."""
    shape = llm_shape(text_config)
    n_full = tokens.frames * tokens.tokens_per_frame
    merged = tokens.visual - 1
    figures = method.stats(tokens.generated, sample)
    figures["retained_prefill_ratio"] = merged / n_full if n_full else 1.0
    figures["tflops_full"] = full_tflops(shape, n_full, tokens.generated)
    figures["prefill_tflops_full"] = prefill_flops(shape, n_full) / 1e12
    prune_layer, prune_ratio, pruned_share = shape.layers, 0.0, 0.0
    if options.method.method == "dycoke" and figures.get("decode_steps", 0) > 0:
        prune_layer, prune_ratio = options.method.prune_layer, options.method.prune_ratio
        pruned_share = figures["pruned_steps"] / figures["decode_steps"]
    if options.method.method == "fastv":
        kept = min(figures["visual_kept_late_layers"], merged)
        layer = options.method.fastv_layer
        figures["tflops"] = fastv_tflops(shape, merged, kept, tokens.generated, layer)
        late = shape.layers - layer
        prefill = prefill_flops(shape, merged, layers=layer) + prefill_flops(shape, kept, layers=late)
        figures["prefill_tflops"] = prefill / 1e12
    else:
        figures["tflops"] = dycoke_tflops(
            shape, merged, tokens.generated, prune_layer, prune_ratio, pruned_share=pruned_share
        )
        figures["prefill_tflops"] = prefill_flops(shape, merged) / 1e12

    stored = memory.kv_cache_bytes
    seq = tokens.prompt + max(tokens.generated - 1, 0)
    seq_full = seq - tokens.visual + tokens.visual_uncompressed
    full = kv_cache_bytes(text_config, seq_full, value_bytes(dtype))
    hidden_per_step = figures.get("candidates", 0) - figures.get("avg_candidates_attended_late_layers", 0)
    late_share = (shape.layers - prune_layer) / shape.layers
    figures["kv_bytes_full"] = full
    figures["kv_bytes_stored"] = stored
    figures["kv_bytes_saved"] = full - stored
    figures["kv_bytes_attended_per_step"] = int(stored * (1 - late_share * hidden_per_step / seq)) if seq else 0
    figures["kv_bytes_read_per_step_without_dp"] = stored
    return figures
