"""DyCoke stage II on the tiny checkpoint against an independent, naive reference.

The reference below is written from DYCOKE.md alone: an explicit per-layer forward in float32 with
its own KV cache, explicit attention probabilities in every layer, and per-step boolean masks. It
shares nothing with ``dycoke.methods.dycoke`` / ``dycoke.compress.kv_prune`` but the model's weights.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.config import MethodOptions
from dycoke.decoding.prefix import CACHE_ARGUMENT
from dycoke.errors import ConfigError
from dycoke.methods.dycoke import DyCoke

N_VISUAL = 60  # visual tokens in the prompt, newline included
PREFIX, SUFFIX = 5, 6  # text tokens before and after the visual run
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    m = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="sdpa"
    )
    return m.eval()


def make_batch(model: Any, pads: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded embeddings (B, S, D) with a visual run per sample, their mask and visual starts."""
    g = torch.Generator().manual_seed(seed)
    vocab = 900
    embed = model.get_input_embeddings()
    rows, masks, starts = [], [], []
    width = max(pads) + PREFIX + N_VISUAL + SUFFIX
    for b, n_pad in enumerate(pads):
        # sample b: n_pad pad tokens, then text, its visual run, and a longer text tail, so that every
        # sample's visual run starts at its own position
        extra = max(pads) - n_pad
        text_ids = torch.randint(10, vocab, (PREFIX + SUFFIX + extra,), generator=g)
        text = embed(text_ids)
        visual = torch.randn(N_VISUAL, text.shape[-1], generator=g) * (1.0 + b)
        pad_rows = embed(torch.zeros(n_pad, dtype=torch.long))
        rows.append(torch.cat([pad_rows, text[:PREFIX], visual, text[PREFIX:]]))
        masks.append(torch.cat([torch.zeros(n_pad, dtype=torch.long), torch.ones(width - n_pad, dtype=torch.long)]))
        starts.append(n_pad + PREFIX)
    return torch.stack(rows), torch.stack(masks), torch.tensor(starts)


@dataclass
class NaiveTrace:
    """What the reference's gate saw and chose at every decode step (filled by ``naive_generate``)."""

    similarities: list[list[float]] = field(default_factory=list)  # [step][sample] cosine with the previous step
    kept: list[torch.Tensor] = field(default_factory=list)  # [step] (B, n) bool keep set, eviction aside


@torch.no_grad()
def naive_generate(
    model: Any,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    starts: torch.Tensor,
    *,
    prune: bool,
    layer_l: int,
    ratio_p: float,
    threshold: float,
    mode: str,
    evict: bool = False,
    trace: NaiveTrace | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Greedy decoding, explicit attention; returns tokens and per-sample counts of pruned steps.

    ``evict``: the first decode step's keep set is final for layers >= L (what it dropped never returns).
    ``trace``: if given, receives every decode step's similarities and keep sets.
    """
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    lm = model.model.language_model
    cfg = lm.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    b = embeds.shape[0]
    n_cand = N_VISUAL - 2  # reference off-by-one: last merged token and newline never candidates
    keep_n = int(n_cand * (1 - ratio_p))
    cache_k: list[torch.Tensor | None] = [None] * len(lm.layers)
    cache_v: list[torch.Tensor | None] = [None] * len(lm.layers)
    key_mask = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    previous: list[torch.Tensor | None] = [None] * b
    previous_keep: list[torch.Tensor | None] = [None] * b
    pruned_steps = [0] * b
    alive: list[torch.Tensor | None] = [None] * b
    tokens: list[list[int]] = [[] for _ in range(b)]
    x, pos, decoding = embeds, positions, False
    for _ in range(NEW_TOKENS):
        q_len = x.shape[1]
        cos, sin = lm.rotary_emb(x, pos)
        keep_full = torch.ones(b, key_mask.shape[1], dtype=torch.bool)
        for li, layer in enumerate(lm.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(b, q_len, hq, hd).transpose(1, 2)
            k = att.k_proj(h).view(b, q_len, hkv, hd).transpose(1, 2)
            v = att.v_proj(h).view(b, q_len, hkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            ck, cv = cache_k[li], cache_v[li]
            keys = k if ck is None else torch.cat([ck, k], dim=2)
            values = v if cv is None else torch.cat([cv, v], dim=2)
            cache_k[li], cache_v[li] = keys, values
            s = keys.shape[2]
            kr = keys.repeat_interleave(hq // hkv, dim=1)
            vr = values.repeat_interleave(hq // hkv, dim=1)
            scores = (q @ kr.transpose(-1, -2)) * hd**-0.5  # (B, Hq, q, S)
            causal = torch.ones(q_len, s, dtype=torch.bool).tril(diagonal=s - q_len)
            allowed = causal[None, None] & key_mask[:, None, None, :]
            if decoding and prune and li >= layer_l:
                allowed = allowed & keep_full[:, None, None, :]
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), torch.zeros(()))
            if decoding and prune and li == layer_l - 1:
                mean = probs.mean(dim=1)[:, 0]  # (B, S): head average for the one new query
                step_similarities: list[float] = []
                step_kept: list[torch.Tensor] = []
                for bi in range(b):
                    st = int(starts[bi])
                    a = mean[bi, st : st + n_cand]
                    prev = previous[bi]
                    c = 0.0 if prev is None else float(torch.nn.functional.cosine_similarity(a, prev, dim=0))
                    if c < threshold:
                        chosen = torch.zeros(n_cand, dtype=torch.bool)
                        chosen[a.topk(keep_n).indices] = True
                    elif mode == "reuse" and previous_keep[bi] is not None:
                        chosen = previous_keep[bi]  # type: ignore[assignment]
                    else:
                        chosen = torch.ones(n_cand, dtype=torch.bool)
                    previous[bi], previous_keep[bi] = a, chosen
                    step_similarities.append(c)
                    step_kept.append(chosen)
                    pruned_steps[bi] += int(not bool(chosen.all()))
                    if evict:
                        if alive[bi] is None:
                            alive[bi] = chosen
                        keep_full[bi, st : st + n_cand] = alive[bi]  # type: ignore[assignment]
                    else:
                        keep_full[bi, st : st + n_cand] = chosen
                if trace is not None:
                    trace.similarities.append(step_similarities)
                    trace.kept.append(torch.stack(step_kept))
            out = (probs @ vr).transpose(1, 2).reshape(b, q_len, hq * hd)
            x = x + att.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = model.lm_head(lm.norm(x[:, -1]))
        nxt = logits.argmax(-1)
        for bi in range(b):
            tokens[bi].append(int(nxt[bi]))
        x = model.get_input_embeddings()(nxt)[:, None]
        key_mask = torch.cat([key_mask, torch.ones(b, 1, dtype=torch.bool)], dim=1)
        pos = pos[:, -1:] + 1
        decoding = True
    return tokens, pruned_steps


def greedy(model: Any, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int = NEW_TOKENS, **extra: Any) -> Any:
    """transformers' own greedy ``generate`` for exactly ``new_tokens`` tokens; ``extra``: a method's cache."""
    return model.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **extra,
    )


def dycoke_generate(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, options: MethodOptions
) -> tuple[list[list[int]], list[int]]:
    method = DyCoke(options, model)
    with torch.inference_mode(), method.decoding(visual_start=starts, num_visual=N_VISUAL) as cache:
        extra: dict[str, Any] = {CACHE_ARGUMENT: cache} if cache is not None else {}
        out = greedy(model, embeds, mask, **extra)
    state = method.state
    pruned = [] if state is None or state.steps == 0 else state.pruned_steps().tolist()
    return out.tolist(), pruned


SETTINGS = [
    pytest.param(0.9, "official", id="gated-official"),
    pytest.param(1.0, "official", id="always-prune"),
    pytest.param(0.9999, "reuse", id="gated-reuse"),
]


@pytest.mark.parametrize("pads", [[0], [0, 7], [3, 0, 11]], ids=["batch1", "batch2", "batch3"])
@pytest.mark.parametrize(("threshold", "mode"), SETTINGS)
def test_dp_matches_naive_reference(model: Any, pads: list[int], threshold: float, mode: str) -> None:
    embeds, mask, starts = make_batch(model, pads)
    assert len(set(starts.tolist())) == len(pads)  # each sample's visual run starts elsewhere
    options = MethodOptions(method="dycoke", prune_layer=2, prune_ratio=0.7, gate_threshold=threshold, gate_mode=mode)  # type: ignore[arg-type]
    got, got_pruned = dycoke_generate(model, embeds, mask, starts, options)
    expected, expected_pruned = naive_generate(
        model, embeds, mask, starts, prune=True, layer_l=2, ratio_p=0.7, threshold=threshold, mode=mode
    )
    assert got == expected
    assert got_pruned == expected_pruned
    assert all(p >= 1 for p in got_pruned)  # the first decode step always prunes (similarity 0)
    if threshold == 1.0:
        assert all(p == NEW_TOKENS - 1 for p in got_pruned)


# Stable gate steps, end to end. With random weights the attention moves so much between steps that the
# usual thresholds prune at every step; a threshold placed among the similarities the reference really
# sees gives runs with both pruned and stable steps, so "official" (a stable step prunes nothing) and
# "reuse" (a stable step keeps the previous selection) are told apart end to end.
MARGIN = 1e-3  # least distance between a chosen threshold and any similarity: rounding cannot flip a decision
MIXED_PADS = [pytest.param([0], id="batch1"), pytest.param([3, 0, 11], id="batch3")]


def later_similarities(trace: NaiveTrace) -> list[float]:
    """Every sample's gate similarity from the second decode step on (the first is 0 by definition)."""
    return [c for step in trace.similarities[1:] for c in step]


def mixed_threshold(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, mode: str, evict: bool = False
) -> tuple[float, list[list[int]], NaiveTrace]:
    """A gate threshold at which the reference has both pruned and stable steps after the first one.

    The similarities depend on the earlier decisions (a pruned step changes the next tokens), so a
    candidate is checked on its own run: candidates are the midpoints between the later similarities
    of an always-pruning run, nearest their median first; the first whose run has a similarity on each
    side and none within ``MARGIN`` wins. Returns it with that run's tokens and trace.
    """
    run = partial(naive_generate, model, embeds, mask, starts, prune=True, layer_l=2, ratio_p=0.7, mode=mode)
    probe = NaiveTrace()
    run(threshold=1.0, evict=evict, trace=probe)
    observed = sorted(later_similarities(probe))
    median = statistics.median(observed)
    midpoints = [(lo + hi) / 2 for lo, hi in itertools.pairwise(observed) if hi - lo > 2 * MARGIN]
    for threshold in sorted(midpoints, key=lambda t: abs(t - median)):
        trace = NaiveTrace()
        tokens, _ = run(threshold=threshold, evict=evict, trace=trace)
        later = later_similarities(trace)
        if min(abs(c - threshold) for c in later) >= MARGIN and min(later) < threshold < max(later):
            return threshold, tokens, trace
    pytest.fail(f"no threshold gives both pruned and stable steps among {observed}")


def dycoke_recorded(
    model: Any, embeds: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor, options: MethodOptions
) -> tuple[list[list[int]], DyCoke]:
    """The implementation's tokens, and the method with its state (every step's keep set and attention)."""
    method = DyCoke(options, model)
    method.record = True
    with torch.inference_mode(), method.decoding(visual_start=starts, num_visual=N_VISUAL) as cache:
        extra: dict[str, Any] = {CACHE_ARGUMENT: cache} if cache is not None else {}
        out = greedy(model, embeds, mask, **extra)
    return out.tolist(), method


def check_gate_steps(method: DyCoke, trace: NaiveTrace, threshold: float) -> None:
    """Same similarities, same decisions, same keep set at every decode step; both kinds of step occur."""
    state = method.state
    assert state is not None and state.attention_history is not None
    steps = state.steps
    assert steps == len(trace.similarities) == NEW_TOKENS - 1
    attention = state.attention_history[:steps].cpu()  # (steps, B, n)
    got = torch.cat(
        [
            torch.zeros(1, attention.shape[1]),
            torch.nn.functional.cosine_similarity(attention[1:], attention[:-1], dim=-1),
        ]
    )
    expected = torch.tensor(trace.similarities)
    torch.testing.assert_close(got, expected, rtol=0, atol=MARGIN / 10)
    stable = expected >= threshold  # (steps, B) the reference's gate decisions
    assert torch.equal(got >= threshold, stable)
    assert not stable[0].any()  # the first step always prunes (similarity 0)
    assert stable[1:].any() and (~stable[1:]).any()  # the case really mixes both kinds of step
    assert torch.equal(state.history[:steps].cpu(), torch.stack(trace.kept))


@pytest.mark.parametrize("pads", MIXED_PADS)
@pytest.mark.parametrize("mode", ["official", "reuse"])
def test_dp_mixed_gate_matches_naive_reference(model: Any, pads: list[int], mode: str) -> None:
    embeds, mask, starts = make_batch(model, pads)
    threshold, expected, trace = mixed_threshold(model, embeds, mask, starts, mode)
    options = MethodOptions(method="dycoke", prune_layer=2, prune_ratio=0.7, gate_threshold=threshold, gate_mode=mode)  # type: ignore[arg-type]
    got, method = dycoke_recorded(model, embeds, mask, starts, options)
    assert got == expected
    check_gate_steps(method, trace, threshold)
    kept = torch.stack(trace.kept)  # (steps, B, n)
    stable = torch.tensor(trace.similarities)[1:] >= threshold
    if mode == "official":  # a stable step attends to every candidate
        assert kept[1:][stable].all()
    else:  # a stable step attends to the previous step's selection, which pruned
        assert torch.equal(kept[1:][stable], kept[:-1][stable])
        assert not kept.all(dim=-1).any()


@pytest.mark.parametrize("pads", MIXED_PADS)
@pytest.mark.parametrize("mode", ["official", "reuse"])
def test_eviction_mixed_gate_matches_the_reference(model: Any, pads: list[int], mode: str) -> None:
    """With eviction the later decisions do not change the answer, only what they would want back."""
    embeds, mask, starts = make_batch(model, pads)
    threshold, expected, trace = mixed_threshold(model, embeds, mask, starts, mode, evict=True)
    options = MethodOptions(
        method="dycoke",
        prune_layer=2,
        prune_ratio=0.7,
        gate_threshold=threshold,
        gate_mode=mode,  # type: ignore[arg-type]
        dp_evict=True,
    )
    got, method = dycoke_recorded(model, embeds, mask, starts, options)
    assert got == expected
    check_gate_steps(method, trace, threshold)
    kept = torch.stack(trace.kept)  # (steps, B, n)
    back = (kept[1:] & ~kept[0]).sum(dim=-1)  # (steps - 1, B) evicted candidates a later step would attend
    ev = method.eviction
    assert ev is not None and ev.back_tokens is not None and ev.back_steps is not None
    assert ev.back_tokens.cpu().tolist() == back.sum(dim=0).tolist()
    assert ev.back_steps.cpu().tolist() == (back > 0).sum(dim=0).tolist()


def test_naive_reference_without_pruning_is_plain_generate(model: Any) -> None:
    """The reference itself is trustworthy: with pruning off it reproduces stock generate."""
    embeds, mask, starts = make_batch(model, [0, 4])
    with torch.inference_mode():
        stock = greedy(model, embeds, mask).tolist()
    naive, _ = naive_generate(
        model, embeds, mask, starts, prune=False, layer_l=2, ratio_p=0.7, threshold=0.9, mode="official"
    )
    assert naive == stock


def test_pruning_changes_the_answer(model: Any) -> None:
    """The hook is really active: always pruning 70 % of the visual KV changes greedy tokens here."""
    embeds, mask, starts = make_batch(model, [0], seed=3)
    full, _ = dycoke_generate(model, embeds, mask, starts, MethodOptions(method="dycoke", prune_ratio=0.0))
    pruned, _ = dycoke_generate(
        model, embeds, mask, starts, MethodOptions(method="dycoke", prune_layer=1, prune_ratio=0.95, gate_threshold=1.0)
    )
    assert full != pruned


def test_hook_is_removed_after_generation(model: Any) -> None:
    _, _, starts = make_batch(model, [0])
    method = DyCoke(MethodOptions(method="dycoke"), model)
    with method.decoding(visual_start=starts, num_visual=N_VISUAL):
        assert model.model.language_model.config._attn_implementation == "dycoke_dp"
    assert model.model.language_model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("pads", [[0], [3, 0, 11]], ids=["batch1", "batch3"])
@pytest.mark.parametrize("threshold,mode", [(0.9, "official"), (1.0, "official"), (0.9999, "reuse")])
def test_eviction_matches_the_reference_and_frees_the_entries(
    model: Any, pads: list[int], threshold: float, mode: str
) -> None:
    embeds, mask, starts = make_batch(model, pads)
    options = MethodOptions(
        method="dycoke",
        prune_layer=2,
        gate_threshold=threshold,
        gate_mode=mode,  # type: ignore[arg-type]
        dp_evict=True,
    )
    method = DyCoke(options, model)
    with torch.inference_mode(), method.decoding(visual_start=starts, num_visual=N_VISUAL) as cache:
        assert cache is not None
        extra: dict[str, Any] = {CACHE_ARGUMENT: cache}
        out = greedy(model, embeds, mask, **extra)
    expected, _ = naive_generate(
        model, embeds, mask, starts, prune=True, layer_l=2, ratio_p=0.7, threshold=threshold, mode=mode, evict=True
    )
    assert out.tolist() == expected
    s = mask.shape[1]
    candidates, keep = N_VISUAL - 2, int((N_VISUAL - 2) * 0.3)
    layers: Any = cache.layers  # DynamicLayers: keys (B, Hkv, S, d)
    assert layers[1].keys.shape[2] == s + NEW_TOKENS - 1  # layers < L keep everything
    assert layers[2].keys.shape[2] == s - candidates + keep + NEW_TOKENS - 1  # evicted for good
    stats = method.stats(NEW_TOKENS)
    assert stats["dp_evict"] and stats["evicted"] == candidates - keep
    if threshold == 1.0 and mode == "official":  # a new top-k every step: how often would it want more?
        assert 0.0 <= stats["evicted_wanted_back_step_share"] <= 1.0
    if mode == "reuse":  # reuse keeps the first selection while stable: nothing wanted back on such steps
        assert stats["evicted_wanted_back_avg_tokens"] <= candidates - keep


def test_eviction_needs_a_pruning_first_step() -> None:
    with pytest.raises(ConfigError, match="dp-evict needs a gate threshold above 0"):
        MethodOptions(dp_evict=True, gate_threshold=0.0)
