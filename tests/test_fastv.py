"""FastV: exact selection on synthetic inputs, and generation on the tiny checkpoint against an
independent reference that really removes the dropped tokens from layers >= K (the authors'
"inplace" variant), with its own explicit attention and per-layer caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.compress.fastv import fastv_keep_count, kept_slots
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.decoding.prefix import CACHE_ARGUMENT
from dycoke.decoding.static import StaticGreedyDecoder
from dycoke.methods.fastv import FastV
from dycoke.pipeline import VideoQA
from tests.test_dp_exact import N_VISUAL, greedy, make_batch
from tests.videos import textured_frames, write_video

NEW_TOKENS = 6


def test_keep_count_rounds_like_the_authors() -> None:
    assert fastv_keep_count(6273, 0.35) == round(6273 * 0.35) == 2196
    assert fastv_keep_count(10, 0.25) == 2  # round half to even, as Python's round
    assert fastv_keep_count(10, 0.01) == 1  # never empty
    assert fastv_keep_count(10, 1.0) == 10


def test_kept_slots_keep_text_and_the_best_visual_tokens() -> None:
    attention = torch.tensor(
        [
            [0.0, 0.1, 0.5, 0.1, 0.9, 0.3, 0.0, 0.0],  # visual slots 2..5 -> best 4 and 2
            [0.2, 0.0, 0.0, 0.4, 0.1, 0.2, 0.3, 0.0],  # visual slots 3..6 -> best 3 and 6
        ]
    )
    slots = kept_slots(attention, torch.tensor([2, 3]), num_visual=4, keep=2)
    assert slots.tolist() == [[0, 1, 2, 4, 6, 7], [0, 1, 2, 3, 6, 7]]


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    m = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="sdpa"
    )
    return m.eval()


@torch.no_grad()
def inplace_fastv(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, layer_k: int, keep: int
) -> list[list[int]]:
    """Greedy decoding where layers >= K never see the dropped tokens (removed, not masked)."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm = model.model.language_model
    cfg = lm.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    b, s = mask.shape
    n_layers = len(lm.layers)
    caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
    key_masks: list[torch.Tensor] = [mask.bool()] * n_layers
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tokens: list[list[int]] = [[] for _ in range(b)]

    def attend(li: int, x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        layer = lm.layers[li]
        att = layer.self_attn
        q_len = x.shape[1]
        cos, sin = lm.rotary_emb(x, pos)
        h = layer.input_layernorm(x)
        q = att.q_proj(h).view(b, q_len, hq, hd).transpose(1, 2)
        k = att.k_proj(h).view(b, q_len, hkv, hd).transpose(1, 2)
        v = att.v_proj(h).view(b, q_len, hkv, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cached = caches[li]
        keys = k if cached is None else torch.cat([cached[0], k], dim=2)
        values = v if cached is None else torch.cat([cached[1], v], dim=2)
        caches[li] = (keys, values)
        total = keys.shape[2]
        scores = (q @ keys.repeat_interleave(hq // hkv, 1).transpose(-1, -2)) * hd**-0.5
        causal = torch.ones(q_len, total, dtype=torch.bool).tril(diagonal=total - q_len)
        allowed = causal[None, None] & key_mask[:, None, None, :]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros(()))
        out = (probs @ values.repeat_interleave(hq // hkv, 1)).transpose(1, 2).reshape(b, q_len, hq * hd)
        x = x + att.o_proj(out)
        return x + layer.mlp(layer.post_attention_layernorm(x)), probs

    # prefill
    x, pos = embeds, positions
    slots = torch.empty(0, dtype=torch.long)  # chosen at layer K-1
    for li in range(n_layers):
        if li == layer_k:  # drop the tokens: hidden states, positions and masks of the kept slots only
            index = slots.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x, pos = x.gather(1, index), pos.gather(1, slots)
            kept_mask = mask.bool().gather(1, slots)
            for later in range(layer_k, n_layers):
                key_masks[later] = kept_mask
        x, probs = attend(li, x, pos, key_masks[li])
        if li == layer_k - 1:
            last = probs.mean(dim=1)[:, -1]  # head mean, the last prompt token's row
            chosen = []
            for bi in range(b):
                st = int(starts[bi])
                top = last[bi, st : st + N_VISUAL].topk(keep).indices + st
                rest = [i for i in range(s) if not st <= i < st + N_VISUAL]
                chosen.append(sorted(rest + top.tolist()))
            slots = torch.tensor(chosen)
    pos = positions[:, -1:]
    for step in range(NEW_TOKENS):
        nxt = model.lm_head(lm.norm(x[:, -1])).argmax(-1)
        for bi in range(b):
            tokens[bi].append(int(nxt[bi]))
        if step == NEW_TOKENS - 1:
            break
        x, pos = model.get_input_embeddings()(nxt)[:, None], pos + 1
        for li in range(n_layers):
            key_masks[li] = torch.cat([key_masks[li], torch.ones(b, 1, dtype=torch.bool)], dim=1)
            x, _ = attend(li, x, pos, key_masks[li])
    return tokens


@pytest.mark.parametrize("layer_k,keep_ratio", [(2, 0.35), (1, 0.5), (3, 0.2)])
def test_fastv_generates_what_removing_the_tokens_generates(model: Any, layer_k: int, keep_ratio: float) -> None:
    embeds, mask, starts = make_batch(model, [0, 4, 1])
    keep = fastv_keep_count(N_VISUAL, keep_ratio)
    expected = inplace_fastv(model, embeds, mask, starts, layer_k, keep)
    method = FastV(MethodOptions(method="fastv", fastv_layer=layer_k, fastv_keep=keep_ratio), model)
    with torch.inference_mode(), method.decoding(visual_start=starts, num_visual=N_VISUAL) as cache:
        out = greedy(model, embeds, mask, NEW_TOKENS, **{CACHE_ARGUMENT: cache})
    assert out.tolist() == expected
    # the static decoder: later layers become shorter static layers, each decode step maps them to slots
    static = FastV(MethodOptions(method="fastv", fastv_layer=layer_k, fastv_keep=keep_ratio), model)
    decoder = StaticGreedyDecoder(
        model, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_ids=[0], pad_id=0, use_graph=False
    )
    with torch.inference_mode(), static.decoding(visual_start=starts, num_visual=N_VISUAL) as own:
        got = decoder.generate(embeds, mask, prefix=own, compaction=static.compaction)
    assert got.tolist() == expected
    assert decoder.cache.layers[layer_k].keys.shape[2] == s_kept_plus(mask, keep) + NEW_TOKENS
    # layers >= K store only the kept prompt entries (plus the generated tokens), layers < K everything
    s = mask.shape[1]
    assert cache.layers[layer_k - 1].keys.shape[2] == s + NEW_TOKENS - 1
    assert cache.layers[layer_k].keys.shape[2] == s - N_VISUAL + keep + NEW_TOKENS - 1
    assert method.stats(NEW_TOKENS)["visual_kept_late_layers"] == keep


def s_kept_plus(mask: torch.Tensor, keep: int) -> int:
    """Prompt entries a layer >= K stores: the prompt less the visual tokens FastV dropped."""
    return int(mask.shape[1]) - N_VISUAL + keep


def test_fastv_keeping_everything_is_the_full_path(tiny_checkpoint: Path, tmp_path: Path) -> None:
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))
    clip = write_video(tmp_path / "c.mp4", textured_frames(12, 96, 128, seed=3), fps=6)
    prepared = qa.prepare(clip, VideoOptions(num_frames=4))

    def run(method: str, **kwargs: Any) -> RunOptions:
        return RunOptions(
            video=VideoOptions(num_frames=4),
            generation=GenerationOptions(max_new_tokens=8, min_new_tokens=8),
            method=MethodOptions(method=method, **kwargs),  # type: ignore[arg-type]
        )

    full = qa.answer(prepared, "What moves?", run("full"))
    fastv = qa.answer(prepared, "What moves?", run("fastv", fastv_keep=1.0))
    assert fastv.token_ids == full.token_ids
    assert fastv.compression["fastv_retained_ratio"] == 1.0
    assert fastv.compression["tflops"] == pytest.approx(fastv.compression["tflops_full"])
    pruned = qa.answer(prepared, "What moves?", run("fastv"))
    assert pruned.tokens.visual == full.tokens.visual  # every token enters the LLM ...
    assert pruned.compression["visual_kept_late_layers"] == round(785 * 0.35)  # ... 35 % survive layer 2
    assert pruned.compression["tflops"] < full.compression["tflops"]
    # layers 2 and 3 of 4 store 275 of the 785 visual entries
    dropped_bytes = pruned.memory.kv_cache_bytes - full.memory.kv_cache_bytes
    per_token_layer = full.memory.kv_cache_bytes // ((full.tokens.prompt + 7) * 4)
    assert dropped_bytes == -(785 - 275) * 2 * per_token_layer
