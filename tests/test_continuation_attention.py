"""The masked prefill that continues a cache (a batch's padded questions after a shared prefix) reads each
K/V head once: exact against repeating the heads, and taken only where it applies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import repeat_kv

from dycoke import attention
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.pipeline import VideoQA
from tests.videos import textured_frames, write_video


def _case(
    batch: int,
    heads: int,
    kv_heads: int,
    queries: int,
    keys: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (B, Hq, q, d) queries over (B, Hkv, S, d) keys; a (B, 1, q, S) mask: causal over the last
    q keys, and each row's own run of padding just before them (the layout of ``pad_rows``)."""
    g = torch.Generator().manual_seed(batch * 1000 + keys)
    query = torch.randn(batch, heads, queries, 16, generator=g).to(device, dtype)
    key = torch.randn(batch, kv_heads, keys, 16, generator=g).to(device, dtype)
    value = torch.randn(batch, kv_heads, keys, 16, generator=g).to(device, dtype)
    start = keys - queries
    slots = torch.arange(keys)
    mask = (slots[None, :] <= torch.arange(start, keys)[:, None]).expand(batch, queries, keys).clone()
    for row in range(batch):
        pad = row % 3
        mask[row, :, start - pad : start] = False
    return query, key, value, mask[:, None].to(device)


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize(("heads", "kv_heads", "keys"), [(28, 4, 61), (4, 2, 40), (14, 2, 33)])
def test_continuation_attention_equals_repeating_the_kv_heads(heads: int, kv_heads: int, keys: int) -> None:
    query, key, value, mask = _case(3, heads, kv_heads, 5, keys)
    bias = attention.grouped_rows_bias(mask, heads // kv_heads, query.dtype)
    out, _ = attention.continuation_attention(query, key, value, bias, None)
    assert out.shape == (3, 5, heads, 16)
    torch.testing.assert_close(out, _reference(query, key, value, mask), rtol=1e-5, atol=1e-5)


def test_the_rows_bias_repeats_the_mask_for_every_head_of_a_group_in_row_order() -> None:
    _, _, _, mask = _case(2, 8, 2, 3, 20)
    bias = attention.grouped_rows_bias(mask, 4, torch.float16)
    assert bias.shape == (2, 1, 12, 20) and bias.stride(-2) == 32  # storage padded to 16 keys
    for head in range(4):
        rows = bias[:, 0, head * 3 : (head + 1) * 3]
        assert torch.equal(rows == 0, mask[:, 0])
        assert torch.isneginf(rows[~mask[:, 0]]).all()


def test_it_applies_only_to_a_grouped_cuda_prefill_that_continues_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, _, mask = _case(2, 8, 2, 3, 20)
    assert not attention.continuation_applies(query, key, mask)  # on the CPU: transformers' SDPA path
    if not torch.cuda.is_available():
        return
    cuda = [t.cuda() for t in (query, key, mask)]
    assert attention.continuation_applies(*cuda)
    assert not attention.continuation_applies(cuda[0], cuda[0], cuda[2][..., :3])  # no grouped heads
    whole = _case(2, 8, 2, 20, 20, "cuda")
    assert not attention.continuation_applies(whole[0], whole[1], whole[3])  # a whole prompt: not a continuation
    assert not attention.continuation_applies(cuda[0], cuda[1], cuda[2][..., :19])  # mask over other slots
    monkeypatch.setenv(attention.CONTINUATION_ATTENTION_ENV, "0")
    assert not attention.continuation_applies(*cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_continuation_attention_on_cuda_in_bf16_is_sdpa_up_to_rounding() -> None:
    query, key, value, mask = _case(4, 28, 4, 25, 3000, "cuda", torch.bfloat16)
    bias = attention.grouped_rows_bias(mask, 7, query.dtype)
    out, _ = attention.continuation_attention(query, key, value, bias, None)
    torch.testing.assert_close(out.float(), _reference(query, key, value, mask).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_a_batch_continuing_the_shared_prefix_through_it_answers_as_one_by_one(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """On the CPU the static decoder would take transformers' path: forced here, every masked layer of the
    batch's questions' prefill runs ``continuation_attention`` (one bias per forward, every layer)."""
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))
    clip = write_video(tmp_path / "clip.mp4", textured_frames(16, 96, 128, seed=4), fps=8)
    options = RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=6, min_new_tokens=6, decoder="static"),
        method=MethodOptions(method=method, prune_layer=2),  # type: ignore[arg-type]
    )
    prepared = qa.prepare(clip, options.video)
    questions = ["What moves?", "Describe the background in detail, please.", "Why?"]
    alone = [qa.answer(prepared, q, options).token_ids for q in questions]
    calls: list[tuple[int, ...]] = []
    continuation = attention.continuation_attention

    def counted(query: torch.Tensor, *args: Any) -> tuple[torch.Tensor, None]:
        calls.append(tuple(query.shape))
        return continuation(query, *args)

    monkeypatch.setattr(attention, "continuation_applies", lambda query, key, mask: key.shape[2] > query.shape[2])
    monkeypatch.setattr(attention, "continuation_attention", counted)
    batched = qa.answer_many(prepared, questions, options, batch_size=3)
    assert [r.token_ids for r in batched] == alone
    layers = qa.loaded.text_config.num_hidden_layers
    assert len(calls) == layers and all(shape[0] == 3 and shape[2] > 1 for shape in calls)
