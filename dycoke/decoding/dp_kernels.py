"""DyCoke's decode-time pruning (stage II) in two Triton kernels, for the captured decode step.

``PruneState.update`` and ``head_mean_attention`` (``dycoke/compress/kv_prune.py``) define what a decode
step of DP computes; in torch they are about 35 small kernels at layer L-1 (a float32 copy of the
keys, the scores, softmax, the head mean, the cosine, a top-k, the keep mask and the bias of the later
layers), whose cost on an H200 ate what the shorter cache saved. Here the same step is:

1. the layer's own attention (``kernels.split_attention``), asked for each head's log-sum-exp;
2. ``visual_attention``: the head-mean probabilities on the visual candidates only, ``mean_h
   exp2(score_h,s - lse_h)``, each score computed again from the bf16 key (grid: rows x blocks of
   candidates);
3. ``decide``: one program per row: the gate's cosine with the previous step, the top ``keep``
   candidates (a binary search on the float32 bit patterns, run only at a step that prunes), the keep
   set, the state's buffers (previous attention, keep set, the step's history) and the additive bias of
   layers >= L (the step's bias with -inf at the candidates not kept).

What differs from the torch definition, by construction: float32 sums in another order (scores,
softmax denominator, cosine), so attention probabilities agree to about 1e-6 relative and a gate whose
similarity lies within that of the threshold may decide the other way; among candidates tied at the
``keep``-th value the lowest positions are kept (torch's ``topk`` leaves ties unspecified). The
torch path stays for everything else (the CPU, float32, ``DYCOKE_DP_KERNELS=0``, recorded attention,
eviction, more than ``MAX_CANDIDATES`` candidates).

Shapes: B rows; Hq / Hkv query and key-value heads of size d; L cache slots; n visual candidates.
"""

from __future__ import annotations

from typing import Any

import torch

from dycoke.compress.kv_prune import PruneState
from dycoke.decoding.kernels import split_attention, split_attention_applies, wait_for_compiles
from dycoke.switches import switch

DP_KERNELS_ENV = "DYCOKE_DP_KERNELS"
"""``DYCOKE_DP_KERNELS=0`` keeps DP's torch operations inside the decode step (default: these kernels)."""

DP_GATHER_ENV = "DYCOKE_DP_GATHER"
"""``DYCOKE_DP_GATHER=0``: layers >= L read the whole cache through the step's bias; ``=1``: only the
slots it lets them attend to (``kernels.gathered_attention``) at any batch size; unset: from two rows on
(``gather_later_layers``)."""

MAX_CANDIDATES = 65536
"""Most candidates ``decide`` holds in one program's registers (a 4-minute video at 1 fps, unmerged)."""

VISUAL_BLOCK = 64
"""Candidates per program of ``visual_attention``."""

_KERNELS: dict[str, Any] = {}


def define_dp_kernels() -> dict[str, Any]:
    """Define the two kernels (uncached: under ``TRITON_INTERPRET=1`` they run on CPU tensors, which
    ``tests/interpreted_kernels.py`` checks against the torch definition)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def visual_attention_kernel(  # type: ignore[no-untyped-def]
        q,
        k,
        bias,
        lse,
        starts,
        out,
        q_row,
        q_head,
        k_row,
        k_head,
        k_slot,
        bias_row,
        n,
        scale,
        HKV: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # one program: BLOCK candidates of one row, every query head; base-2 scores as split_attention's
        row = tl.program_id(0).to(tl.int64)
        index = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = index < n
        slots = tl.load(starts + row) + index
        log2e: tl.constexpr = 1.4426950408889634
        add = tl.load(bias + row * bias_row + slots, mask=inside, other=float("-inf")).to(tl.float32) * log2e
        rows = tl.arange(0, GROUP_PAD)
        row_ok = rows < GROUP
        dims = tl.arange(0, D)
        total = tl.zeros((BLOCK,), tl.float32)
        for head in tl.static_range(HKV):
            heads = head * GROUP + rows
            query = tl.load(q + row * q_row + heads[:, None] * q_head + dims[None, :], mask=row_ok[:, None], other=0.0)
            keys = tl.load(
                k + row * k_row + head * k_head + slots[:, None] * k_slot + dims[None, :],
                mask=inside[:, None],
                other=0.0,
            )
            scores = tl.dot(query, tl.trans(keys)) * (scale * log2e) + add[None, :]  # (GROUP_PAD, BLOCK)
            denominator = tl.load(lse + row * (HKV * GROUP) + heads, mask=row_ok, other=float("inf"))
            total += tl.sum(tl.exp2(scores - denominator[:, None]), axis=0)
        tl.store(out + row * n + index, total / (HKV * GROUP), mask=inside)

    @triton.jit(do_not_specialize=["n", "length", "keep", "max_steps"])
    def decide_kernel(  # type: ignore[no-untyped-def]
        visual,
        previous,
        kept,
        history,
        step,
        starts,
        base_bias,
        out_bias,
        slot_index,
        slot_counts,
        n,
        length,
        keep,
        threshold,
        max_steps,
        bias_row,
        out_row,
        index_row,
        REUSE: tl.constexpr,
        NP: tl.constexpr,
        BLOCK_BIAS: tl.constexpr,
        LIST_SLOTS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        rows = tl.num_programs(0)
        index = tl.arange(0, NP)
        inside = index < n
        current = tl.load(visual + row * n + index, mask=inside, other=0.0)
        before = tl.load(previous + row * n + index, mask=inside, other=0.0)
        # the gate: cosine similarity, norms clamped at 1e-8 as torch's (0 against the zeros of step one)
        norms = tl.maximum(tl.sqrt(tl.sum(current * current, axis=0)), 1e-8) * tl.maximum(
            tl.sqrt(tl.sum(before * before, axis=0)), 1e-8
        )
        prune = tl.sum(current * before, axis=0) / norms < threshold
        selected = tl.zeros((NP,), tl.int1)
        if prune:
            # the keep-th largest value's bits: probabilities are >= 0, so their int32 bit patterns sort as
            # the values do; the largest t with at least `keep` candidates >= t, by halving [0, +inf] (31
            # block-wide sums; two bits a round, 16 sums of four counts, measured slower on the H200: 110
            # against 36 us per pruning step at 12k candidates, e2e-h200-dp-kernels*.json)
            bits = tl.where(inside, current.to(tl.int32, bitcast=True), -1)
            low = tl.zeros((), tl.int32)
            high = tl.full((), 0x7F800001, tl.int32)
            for _ in tl.static_range(31):
                middle = low + (high - low) // 2
                enough = tl.sum((bits >= middle).to(tl.int32), axis=0) >= keep
                low = tl.where(enough, middle, low)
                high = tl.where(enough, high, middle)
            above = bits > low
            tied = (bits == low) & inside
            room = keep - tl.sum(above.to(tl.int32), axis=0)  # ties at the threshold: the first positions
            selected = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
        if REUSE:
            old = tl.load(kept + row * n + index, mask=inside, other=0).to(tl.int1)
            chosen = tl.where(prune, selected, old)
        else:
            chosen = tl.where(prune, selected, inside)  # a step that does not prune keeps everything
        at = tl.minimum(tl.load(step), max_steps - 1)
        tl.store(kept + row * n + index, chosen, mask=inside)
        tl.store(history + (at * rows + row) * n + index, chosen, mask=inside)
        tl.store(previous + row * n + index, current, mask=inside)
        tl.debug_barrier()  # this program's keep set is in memory before the bias reads it back
        start = tl.load(starts + row)
        listed = tl.zeros((), tl.int32)
        for first in range(0, length, BLOCK_BIAS):
            slots = first + tl.arange(0, BLOCK_BIAS)
            ok = slots < length
            value = tl.load(base_bias + row * bias_row + slots, mask=ok, other=0.0)
            position = slots - start
            candidate = ok & (position >= 0) & (position < n)
            keeps = tl.load(kept + row * n + position, mask=candidate, other=1).to(tl.int1)
            hidden = candidate & ~keeps
            later = tl.where(hidden, float("-inf"), value)
            tl.store(out_bias + row * out_row + slots, later, mask=ok)
            if LIST_SLOTS:  # the slots the later layers attend to, in order (kernels.attended_slots)
                attended = ok & (later != float("-inf"))
                entry = listed + tl.cumsum(attended.to(tl.int32), axis=0) - 1
                tl.store(slot_index + row * index_row + entry, slots.to(tl.int32), mask=attended)
                listed += tl.sum(attended.to(tl.int32), axis=0)
        if LIST_SLOTS:
            tl.store(slot_counts + row, listed)

    return {"visual_attention": visual_attention_kernel, "decide": decide_kernel}


def _kernels() -> dict[str, Any]:
    if not _KERNELS:
        _KERNELS.update(define_dp_kernels())
    return _KERNELS


def dp_kernels_apply(
    state: PruneState, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor
) -> bool:
    """Whether ``pruning_step`` takes this layer L-1 (shapes as its): its attention runs on
    ``kernels.split_attention`` (bf16/fp16 on CUDA), on the state's device, no attention is recorded, at
    most ``MAX_CANDIDATES`` candidates, and ``DYCOKE_DP_KERNELS`` not off."""
    return (
        not state.record_attention
        and state.num_candidates <= MAX_CANDIDATES
        and query.device == state.starts.device
        and switch(DP_KERNELS_ENV, default=True)
        and split_attention_applies(query, key, value, bias)
    )


def launch_visual_attention(
    defined: dict[str, Any],
    query: torch.Tensor,
    key: torch.Tensor,
    bias: torch.Tensor,
    lse: torch.Tensor,
    starts: torch.Tensor,
    num_candidates: int,
    scale: float,
) -> torch.Tensor:
    """(B, Hq, 1, d) queries, (B, Hkv, L, d) keys, the (B, 1, 1, L) additive bias and the (B, Hq) base-2
    log-sum-exp of the attention they make -> (B, n) float32 head-mean probabilities of the n slots
    from each row's ``starts`` on (``head_mean_attention(...)`` gathered there)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    group = hq // hkv
    out = torch.empty(b, num_candidates, dtype=torch.float32, device=query.device)
    grid = (b, -(-num_candidates // VISUAL_BLOCK))
    defined["visual_attention"][grid](
        query, key, bias, lse, starts, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2), bias.stride(0),
        num_candidates, scale,
        HKV=hkv, GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), D=d, BLOCK=VISUAL_BLOCK,
        num_warps=4,
    )  # fmt: skip
    return out


def launch_decide(
    defined: dict[str, Any],
    state: PruneState,
    visual: torch.Tensor,
    bias: torch.Tensor,
    listed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``state.update(visual)`` (without recorded attention) and the bias of layers >= L: the (B, 1, 1, L)
    additive ``bias`` with -inf at the candidates not kept -> (B, 1, 1, L), storage padded to 16 slots.
    ``listed``: (B, L) int32 and (B,) int32 tensors that receive ``kernels.attended_slots`` of that bias."""
    b, length = bias.shape[0], bias.shape[-1]
    n = state.num_candidates
    padded = 1 << max(n - 1, 1).bit_length()
    out = torch.empty(b, 1, 1, length + (-length) % 16, dtype=bias.dtype, device=bias.device)[..., :length]
    index, counts = listed if listed is not None else (out, out)
    defined["decide"][(b,)](
        visual, state.previous, state.kept, state.history, state.step, state.starts, bias, out, index, counts,
        n, length, state.keep, state.threshold, state.history.shape[0], bias.stride(0), out.stride(0),
        index.stride(0),
        REUSE=state.mode == "reuse", NP=padded, BLOCK_BIAS=1024, LIST_SLOTS=listed is not None,
        num_warps=min(32, max(4, padded // 512)),
    )  # fmt: skip
    state.step.add_(1)
    return out


def pruning_step(
    state: PruneState,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    *,
    wait: bool = True,
    list_slots: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Layer L-1 of a decode step with DP: its attention output (B, 1, Hq, d), as
    ``kernels.split_attention`` gives it, and the (B, 1, 1, L) additive bias of layers >= L; ``state``
    updated as ``PruneState.update`` updates it. Shapes as ``kernels.split_attention``'s. ``wait``: for
    ``kernels.compile_in_background``'s thread first (the call from that thread does not).
    ``list_slots``: also the slots that bias lets the later layers attend to (``kernels.attended_slots``,
    for ``kernels.gathered_attention``), else None."""
    if wait:
        wait_for_compiles()
    defined = _kernels()
    b, length = query.shape[0], key.shape[2]
    lse = torch.empty(b, query.shape[1], dtype=torch.float32, device=query.device)
    out = split_attention(query, key, value, bias, scale, lse=lse, wait=False)
    visual = launch_visual_attention(defined, query, key, bias, lse, state.starts, state.num_candidates, scale)
    listed = None
    if list_slots:
        listed = (
            torch.empty(b, length, dtype=torch.int32, device=query.device),
            torch.empty(b, dtype=torch.int32, device=query.device),
        )
    return out, launch_decide(defined, state, visual, bias, listed), listed


def gather_later_layers(rows: int) -> bool:
    """Whether DP's later layers read only the slots the step lets them attend to, not the whole cache
    through its bias: for a batch of ``rows`` > 1 unless ``DYCOKE_DP_GATHER=0``; ``=1`` at one row too.

    At a pruned step a row's later layers attend to about a third of its slots: 80 rows at 32 frames
    (7B, H200, every step pruning) answered 82.2 questions/s gathered against 74.0 reading through the
    bias. At one row those reads are a few percent of the step's bytes (the weights are most), and
    where a step prunes nothing the listed read costs more than the contiguous one: 4.68 against 4.61
    ms/token at 128 frames (``benchmarks/results/e2e-h200-gather{1,0}.json``)."""
    return switch(DP_GATHER_ENV, default=rows > 1)


def compile_kernels(hq: int, hkv: int, head: int, device: torch.device, dtype: torch.dtype) -> None:
    """Compile both kernels (or load them from Triton's disk cache) for a model of these heads, at the
    sizes of DyCoke's default 32 frames (2k-4k candidates), on ``kernels.compile_in_background``'s thread."""
    query = torch.zeros(1, hq, 1, head, dtype=dtype, device=device)
    cache = torch.zeros(1, hkv, 3200, head, dtype=dtype, device=device)
    bias = torch.zeros(1, 1, 1, 3200, dtype=dtype, device=device)
    starts = torch.zeros(1, dtype=torch.long, device=device)
    state = PruneState(starts=starts, num_candidates=3000, keep=900, max_steps=1)
    for list_slots in (True, False):
        pruning_step(state, query, cache, cache, bias, 1.0, wait=False, list_slots=list_slots)
