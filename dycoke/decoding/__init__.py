"""The decode loops behind one call: transformers' ``generate`` (``hf``), greedy decoding on a static
KV cache (``static``), and the same with one CUDA graph replay per token (``graph``).

``decode`` runs one batch of prompts with a method's glue installed and returns the generated ids
with a ``DecodeTiming``; ``choose_decoder`` resolves ``auto``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dycoke.config import GenerationOptions
from dycoke.decoding.prefix import PrefixKV, expand_prefix
from dycoke.decoding.streaming import TimedTextStreamer
from dycoke.errors import ConfigError
from dycoke.methods.base import CompressionMethod


@dataclass(frozen=True)
class DecodeTiming:
    """Seconds of one batch's generation: to the first token (prefill), first to last token (decode),
    the whole call; ``steps`` tokens per row that the loop produced; ``decoder`` the loop that ran."""

    decoder: str
    prefill: float
    decode: float
    total: float
    steps: float


def choose_decoder(gen: GenerationOptions, device: torch.device, single_device: bool) -> str:
    """The decode loop for a run: ``auto`` takes the CUDA-graph loop for greedy decoding on one GPU,
    ``hf`` otherwise (sampling, a model spread over devices, a CPU)."""
    if gen.decoder != "auto":
        if gen.decoder == "graph" and device.type != "cuda":
            raise ConfigError(f"decoder 'graph' needs a CUDA device, the model is on {device.type}")
        if gen.decoder != "hf" and not single_device:
            raise ConfigError(f"decoder '{gen.decoder}' runs on one device; a model spread over several uses hf")
        return gen.decoder
    if device.type == "cuda" and not gen.do_sample and single_device:
        return "graph"
    return "hf"


def generation_kwargs(model: Any, tokenizer: Any, gen: GenerationOptions) -> dict[str, Any]:
    """Arguments for ``generate``: greedy unless sampling was asked for; stop at ``<|im_end|>``/EOS."""
    eos: list[int] = []
    for candidate in (
        model.generation_config.eos_token_id,
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ):
        for tid in candidate if isinstance(candidate, list) else [candidate]:
            if isinstance(tid, int) and tid >= 0 and tid not in eos and tid != tokenizer.unk_token_id:
                eos.append(tid)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens or None,
        "do_sample": gen.do_sample,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def decode(
    model: Any,
    decoder: str,
    kwargs: dict[str, Any],
    method: CompressionMethod,
    *,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    visual_starts: int | list[int],
    num_visual: int,
    prefix: PrefixKV | None,
    streamer: TimedTextStreamer,
    stop: Callable[[], bool] | None = None,
    fused_step: bool = True,
    prefill_rows: int = 0,
) -> tuple[torch.Tensor, DecodeTiming]:
    """Generate for one batch ((B, S, D) ``embeds``, (B, S) mask) with ``method``'s glue installed.

    ``prefix``: a shared prefix's KV, expanded for the batch (into the method's own cache when it
    brings one). ``stop``: polled after every step; generation ends early when it returns True.
    ``fused_step``: the static loops decode with ``FusedStep`` where the model allows it.
    ``prefill_rows``: the static loops prefill a larger batch (and take its first step) this many rows at
    a time where the method compacts its cache at that step (``splits_rows``, DP eviction); 0: all at once.
    Returns the (B, n) generated ids and their timing.
    """
    from dycoke.decoding.generate import GenerateDecoder
    from dycoke.decoding.static import RowGroups, StaticGreedyDecoder

    batch = int(embeds.shape[0])
    t0 = time.perf_counter()
    streamer.start()
    steps = int(kwargs["max_new_tokens"])
    with method.decoding(visual_start=visual_starts, num_visual=num_visual, max_steps=steps) as own_cache:
        groups = None
        if decoder != "hf" and 0 < prefill_rows < batch and steps > 1 and getattr(method, "splits_rows", False):
            groups = RowGroups(
                size=prefill_rows,
                prefix=lambda rows: expand_prefix(prefix, rows) if prefix is not None else None,
                scope=method.row_scope,
            )
            cache = None  # each group's prefix is expanded when it runs: the batch's is never made
        else:
            cache = expand_prefix(prefix, batch, into=own_cache) if prefix is not None else own_cache
        if decoder == "hf":
            output = GenerateDecoder(model, kwargs).generate(embeds, attention_mask, streamer, cache, stop)
        else:
            static = StaticGreedyDecoder(
                model,
                max_new_tokens=steps,
                min_new_tokens=int(kwargs["min_new_tokens"] or 0),
                eos_ids=kwargs["eos_token_id"],
                pad_id=kwargs["pad_token_id"],
                use_graph=decoder == "graph",
                fused=fused_step,
                # a method registered elsewhere that does not say: the first step eager, as before
                eager_first_step=getattr(method, "compacts_in_decode", True),
            )
            streamer.put(None)  # the prompt, which the streamer skips
            output = static.generate(
                embeds,
                attention_mask,
                on_tokens=streamer.put,
                prefix=cache,
                compaction=method.compaction,
                stop=stop,
                groups=groups,
            )
            streamer.end()
    t_end = time.perf_counter()
    first = streamer.first_token_s if streamer.first_token_s is not None else t_end - t0
    timing = DecodeTiming(
        decoder=decoder, prefill=first, decode=streamer.decode_s, total=t_end - t0, steps=len(streamer.times)
    )
    return output, timing
