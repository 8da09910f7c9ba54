"""The fused decode step's kernels: Triton on CUDA, the same arithmetic in torch elsewhere.

Each kernel rounds where transformers' Qwen2 modules round (bf16 after every elementwise op of a
bf16 model). Measured on an H200: ``add_rms_norm``, ``silu_mul`` and ``rotary_to_cache`` equal the
torch definitions bit for bit (the rotary kernel since it rounds with integer operations: with float
round trips, most likely folded by the compiler, 23% of bf16 queries were off); Triton's interpreter
checks them on the CPU too (``tests/interpreted_kernels.py``). Shapes use B rows of one
token each; D the hidden size; Hq / Hkv query and key-value heads of size d; L static cache slots.

- ``add_rms_norm(hidden, delta, weight, eps)``: ``h = hidden + delta`` (or ``hidden`` when ``delta`` is
  None) and ``RMSNorm(h)``; (B, D) -> ((B, D), (B, D)). One kernel instead of about seven.
- ``rotary_to_cache(qkv, cos, sin, keys, values, slot, hq, hkv)``: splits the (B, (Hq + 2 Hkv) d) QKV
  projection, applies rotary embeddings (cos/sin (B, d)) to queries and keys, writes the keys and values
  into the (B, Hkv, L, d) static cache at ``slot`` ((1,) long, on the device) and returns the queries
  (B, Hq, 1, d). One kernel instead of about twenty.
- ``silu_mul(gate_up)``: (B, 2F) -> (B, F), ``silu(gate) * up``. One kernel instead of two.
- ``gemv(x, weight, bias)``: (1, K) x (N, K) -> (1, N), the one-row projection, float32 sums; streams
  the weight faster than cuBLAS's one-row kernels at most of the decode step's shapes (H200:
  ``benchmarks/micro_gemv.py``). With ``split_k`` it returns (P, 1, N) float32 column-slice sums, which
  ``add_rms_norm`` adds (the down projection), and with ``silu_input`` it reads ``silu_mul``'s input.
- ``split_attention(query, key, value, bias, scale)``: (B, Hq, 1, d) queries over the (B, Hkv, L, d)
  static cache with an additive (B, 1, 1, L) bias -> (B, 1, Hq, d); split over the slots (flash
  decoding), two kernels, no per-length plan. Its float32 sums run in another order than SDPA's: as
  close to the exact result (tested on an H200), not the same bits.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device`` (a CUDA device with Triton installed)."""
    return device.type == "cuda" and _triton_importable()


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# -- torch reference arithmetic (CPU, and the definition the kernels follow) --------------------------


def add_rms_norm_torch(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if delta is not None and delta.dim() == 3:  # (P, B, D) float32 slices of a split projection
        total = delta[0].clone()
        for part in delta[1:]:
            total += part
        delta = total.to(hidden.dtype)
    h = hidden if delta is None else hidden + delta
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * x.to(h.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_to_cache_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    hq: int,
    hkv: int,
) -> torch.Tensor:
    b = qkv.shape[0]
    d = keys.shape[-1]
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.view(b, hq, 1, d), k.view(b, hkv, 1, d), v.view(b, hkv, 1, d)
    c, s = cos.view(b, 1, 1, d), sin.view(b, 1, 1, d)
    q = (q * c) + (_rotate_half(q) * s)
    k = (k * c) + (_rotate_half(k) * s)
    keys.index_copy_(2, slot, k)
    values.index_copy_(2, slot, v)
    return q


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# -- Triton kernels --------------------------------------------------------------------------------

GEMV_CONFIG = {"block_n": 8, "block_k": 512, "num_warps": 8, "num_stages": 4}
"""``gemv``'s default blocks: the best of ``benchmarks/micro_gemv.py``'s sweep at most 7B shapes (H200)."""

DOWN_GEMV_CONFIG = {"block_n": 16, "block_k": 512, "num_warps": 4, "num_stages": 4, "split_k": 8}
"""The down projection's (K = the MLP's width, 18944 for 7B), its columns in eight slices: 37.0 us for
7B's, against 39.7 us for SiLU * up then cuBLAS, the best of 18 settings (``micro_gemv.py --shapes
down_silu``, H200, ``benchmarks/results/micro-gemv-down-h200.json``)."""

_KERNELS: dict[str, Any] = {}
_round_to_bf16: Any = None  # Triton helpers, defined with the kernels (they find them here by name)
_silu_times: Any = None
_WARMING: list[threading.Thread] = []
_STARTED: dict[tuple[Any, ...], threading.Thread] = {}  # one compile per shape, device and dtype


def compile_in_background(text_config: Any, device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """Compile the kernels for a language model of ``text_config``'s shape (or load them from Triton's
    disk cache) on a thread, while the weights load: a first compile takes seconds, which the first
    answer would otherwise wait for. The kernels' first real call waits for the thread. Returns it, or
    None where the fused step's kernels do not apply. A second call for the same shape, device and
    dtype returns the first call's thread."""
    if not triton_available(device) or getattr(text_config, "model_type", None) != "qwen2":
        return None
    hidden = int(text_config.hidden_size)
    hq, hkv = int(text_config.num_attention_heads), int(text_config.num_key_value_heads)
    head = int(getattr(text_config, "head_dim", None) or hidden // hq)
    width = int(text_config.intermediate_size)
    key = (hidden, hq, hkv, head, width, device, dtype)
    if key in _STARTED:
        return _STARTED[key]

    def compile_all() -> None:
        try:
            with torch.cuda.device(device):
                h = torch.zeros(1, hidden, dtype=dtype, device=device)
                add_rms_norm(h, h, torch.ones_like(h[0]), 1e-6, wait=False)
                add_rms_norm(h, None, torch.ones_like(h[0]), 1e-6, wait=False)
                qkv = torch.zeros(1, (hq + 2 * hkv) * head, dtype=dtype, device=device)
                cos = torch.zeros(1, head, dtype=dtype, device=device)
                keys = torch.zeros(1, hkv, 2, head, dtype=dtype, device=device)
                slot = torch.zeros((), dtype=torch.long, device=device).view(1)
                rotary_to_cache(qkv, cos, cos, keys, torch.zeros_like(keys), slot, hq, hkv, wait=False)
                silu_mul(torch.zeros(1, 2 * width, dtype=dtype, device=device), wait=False)
                # every projection's input width is the hidden size; Triton specialises on the sizes'
                # divisibility, not their values, so a 16-row weight compiles what the real ones use
                weight = torch.zeros(16, hidden, dtype=dtype, device=device)
                for rows in (4, 8):
                    for bias in (None, weight[0]):
                        config = {**GEMV_CONFIG, "block_n": rows}
                        gemv(h, weight, bias, config=config, wait=False)
                down = torch.zeros(16, width, dtype=dtype, device=device)
                gate_up = torch.zeros(1, 2 * width, dtype=dtype, device=device)
                parts = gemv(gate_up, down, silu_input=True, config=DOWN_GEMV_CONFIG, wait=False)
                add_rms_norm(h, torch.zeros(parts.shape[0], 1, hidden, device=device), h[0], 1e-6, wait=False)
                query = torch.zeros(1, hq, 1, head, dtype=dtype, device=device)
                cache = torch.zeros(1, hkv, 16, head, dtype=dtype, device=device)
                bias = torch.zeros(1, 1, 1, 16, dtype=dtype, device=device)
                if split_attention_applies(query, cache, cache, bias):
                    split_attention(query, cache, cache, bias, 1.0, wait=False)
                    gathered_attention(query, cache, cache, attended_slots(bias), 1.0, wait=False)
                    from dycoke.decoding import dp_kernels  # it imports this module

                    dp_kernels.compile_kernels(hq, hkv, head, device, dtype)
                torch.cuda.synchronize(device)
        except Exception:  # the step then compiles on first use, as without this thread
            pass

    thread = threading.Thread(target=compile_all, name="dycoke-kernels", daemon=True)
    _WARMING.append(thread)
    _STARTED[key] = thread
    thread.start()
    return thread


def compile_for_checkpoint(config_file: Path, device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """``compile_in_background`` from a LLaVA-OneVision checkpoint's ``config.json`` read as plain JSON,
    so that the compile starts right after ``import torch``, before transformers' model code has
    imported (a fresh ``dycoke ask``); ``load_model``'s own call then finds it started. None where the
    file lacks a size the kernels need (the load then starts it) or the kernels do not apply."""
    try:
        text = json.loads(config_file.read_text()).get("text_config") or {}
        fields = ("model_type", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        if not all(name in text for name in fields):
            return None
        return compile_in_background(SimpleNamespace(**text), device, dtype)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def wait_for_compiles() -> None:
    """Join ``compile_in_background``'s threads. A CUDA graph's capture must come after: a thread that
    launches or loads kernels during a capture invalidates it."""
    while _WARMING:
        _WARMING.pop().join()


def _build() -> dict[str, Any]:
    """The kernels, defined on first use (Triton compiles each on its first call and caches it on disk)."""
    if not _KERNELS:
        _KERNELS.update(define_kernels())
    return _KERNELS


def define_kernels() -> dict[str, Any]:
    """Define the Triton kernels (uncached: under ``TRITON_INTERPRET=1`` they run on CPU tensors, which
    the tests use to check them without a GPU)."""
    import triton
    import triton.language as tl

    global _round_to_bf16, _silu_times

    @triton.jit
    def _round_to_bf16(x):  # type: ignore[no-untyped-def]
        # float32 -> the float32 holding the nearest bfloat16 (ties to even), with integer operations
        # only: a float round trip (truncate, then extend) is, most likely, folded away by the compiler (on
        # an H200: 23% of the rotated values then differed from torch's bf16 arithmetic)
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _silu_times(g, u):  # type: ignore[no-untyped-def]
        # silu(g) * u as transformers' Qwen2 MLP rounds it: silu in float32, rounded to g's dtype, times u
        g32 = g.to(tl.float32)
        s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype, fp_downcast_rounding="rtne")
        return (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype, fp_downcast_rounding="rtne")

    @triton.jit
    def add_rms_norm_kernel(  # type: ignore[no-untyped-def]
        hidden,
        delta,
        weight,
        out_h,
        out_x,
        n,
        eps,
        HAS_DELTA: tl.constexpr,
        PARTS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        h = tl.load(hidden + row * n + cols, mask=inside, other=0.0)
        if HAS_DELTA:
            if PARTS > 0:  # float32 slices of a split projection: summed in order, rounded as its output
                total = tl.zeros((BLOCK,), tl.float32)
                for part in tl.static_range(PARTS):
                    total += tl.load(delta + (part * tl.num_programs(0) + row) * n + cols, mask=inside, other=0.0)
                dl = total.to(h.dtype, fp_downcast_rounding="rtne")
            else:
                dl = tl.load(delta + row * n + cols, mask=inside, other=0.0)
            h = (h.to(tl.float32) + dl.to(tl.float32)).to(h.dtype, fp_downcast_rounding="rtne")
            tl.store(out_h + row * n + cols, h, mask=inside)
        x = h.to(tl.float32)
        variance = tl.sum(x * x, axis=0) / n
        x = (x * tl.math.rsqrt(variance + eps)).to(h.dtype, fp_downcast_rounding="rtne")
        w = tl.load(weight + cols, mask=inside, other=0.0)
        tl.store(
            out_x + row * n + cols,
            (w.to(tl.float32) * x.to(tl.float32)).to(h.dtype, fp_downcast_rounding="rtne"),
            mask=inside,
        )

    @triton.jit
    def rotary_to_cache_kernel(  # type: ignore[no-untyped-def]
        qkv,
        cos,
        sin,
        q_out,
        keys,
        values,
        slot,
        qkv_row,
        cache_head,
        cache_row,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        D: tl.constexpr,
        BF16: tl.constexpr,
    ):
        row = tl.program_id(0)
        head = tl.program_id(1)
        half = tl.arange(0, D // 2)
        c1 = tl.load(cos + row * D + half).to(tl.float32)
        c2 = tl.load(cos + row * D + D // 2 + half).to(tl.float32)
        s1 = tl.load(sin + row * D + half).to(tl.float32)
        s2 = tl.load(sin + row * D + D // 2 + half).to(tl.float32)
        base = qkv + row * qkv_row + head * D
        x1 = tl.load(base + half)
        x2 = tl.load(base + D // 2 + half)
        dtype = x1.dtype
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        # (x * cos) + (rotate_half(x) * sin), each product and the sum rounded as torch's bf16 ops round
        if BF16:
            r1 = _round_to_bf16(_round_to_bf16(f1 * c1) + _round_to_bf16(-f2 * s1)).to(dtype)
            r2 = _round_to_bf16(_round_to_bf16(f2 * c2) + _round_to_bf16(f1 * s2)).to(dtype)
        else:  # float32: nothing to round between the ops
            r1 = f1 * c1 + -f2 * s1
            r2 = f2 * c2 + f1 * s2
        if head < HQ:
            out = q_out + (row * HQ + head) * D
            tl.store(out + half, r1)
            tl.store(out + D // 2 + half, r2)
        else:
            kv_head = head - HQ
            position = tl.load(slot)
            target = row * cache_row + kv_head * cache_head + position * D
            tl.store(keys + target + half, r1)
            tl.store(keys + target + D // 2 + half, r2)
            v_base = qkv + row * qkv_row + (HQ + HKV + kv_head) * D
            tl.store(values + target + half, tl.load(v_base + half))
            tl.store(values + target + D // 2 + half, tl.load(v_base + D // 2 + half))

    @triton.jit
    def silu_mul_kernel(gate_up, out, f, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < f
        g = tl.load(gate_up + row * 2 * f + cols, mask=inside, other=0.0)
        u = tl.load(gate_up + row * 2 * f + f + cols, mask=inside, other=0.0)
        tl.store(out + row * f + cols, _silu_times(g, u), mask=inside)

    @triton.jit
    def gemv_kernel(  # type: ignore[no-untyped-def]
        x,
        weight,
        bias,
        out,
        n,
        k,
        k_per_split,
        HAS_BIAS: tl.constexpr,
        SILU_INPUT: tl.constexpr,
        EVEN_K: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # program (i, j): rows i * BLOCK_N.. over the j-th k_per_split columns (all of them unless SPLIT)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_start = tl.program_id(1) * k_per_split
        for start in range(k_start, tl.minimum(k_start + k_per_split, k), BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            col_ok = cols < k
            if SILU_INPUT:  # x holds (gate, up): the input is silu(gate) * up, rounded as silu_mul rounds
                if EVEN_K:
                    g = tl.load(x + cols)
                    u = tl.load(x + k + cols)
                else:
                    g = tl.load(x + cols, mask=col_ok, other=0.0)
                    u = tl.load(x + k + cols, mask=col_ok, other=0.0)
                xv = _silu_times(g, u).to(tl.float32)
            elif EVEN_K:
                xv = tl.load(x + cols).to(tl.float32)
            else:
                xv = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
            offsets = rows[:, None] * k + cols[None, :]
            if EVEN_K:
                w = tl.load(weight + offsets, mask=row_ok[:, None], other=0.0)
            else:
                w = tl.load(weight + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[None, :]
        y = tl.sum(acc, axis=1)
        if SPLIT:  # this slice's float32 sum: the consumer adds the slices (no bias here)
            tl.store(out + tl.program_id(1) * n + rows, y, mask=row_ok)
        else:
            if HAS_BIAS:
                y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)

    @triton.jit(do_not_specialize=["length", "chunk", "splits"])
    def decode_attention_partial_kernel(  # type: ignore[no-untyped-def]
        q,
        k,
        v,
        bias,
        index,
        counts,
        part_out,
        part_stats,
        q_row,
        q_head,
        k_row,
        k_head,
        k_slot,
        v_row,
        v_head,
        v_slot,
        bias_row,
        index_row,
        length,
        chunk,
        splits,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        D: tl.constexpr,
        BLOCK: tl.constexpr,
        GATHER: tl.constexpr,
    ):
        # one program: the GROUP query heads of one key-value head of one row, over one chunk of the
        # slots; an online softmax in base 2, its running max, sum and weighted values stored per chunk.
        # GATHER: the slots are the row's first counts[row] entries of index (no bias: every one is
        # attended), cut into `splits` chunks of whole blocks
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        split = tl.program_id(2)
        log2e: tl.constexpr = 1.4426950408889634
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, D)
        row_ok = rows < GROUP
        q_at = q + row * q_row + (head * GROUP + rows)[:, None].to(tl.int64) * q_head + dims[None, :]
        query = tl.load(q_at, mask=row_ok[:, None], other=0.0)
        k_base = k + row * k_row + head.to(tl.int64) * k_head
        v_base = v + row * v_row + head.to(tl.int64) * v_head
        if GATHER:
            attended = tl.load(counts + row)
            chunk = tl.cdiv(tl.cdiv(attended, splits), BLOCK) * BLOCK
            start = split * chunk
            end = tl.minimum(start + chunk, attended)
        else:
            start = split * chunk
            end = tl.minimum(start + chunk, length)
        best = tl.full((GROUP_PAD,), -1.0e30, tl.float32)
        total = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, D), tl.float32)
        for first in range(start, end, BLOCK):
            entries = first + tl.arange(0, BLOCK)
            inside = entries < end
            if GATHER:
                slots = tl.load(index + row * index_row + entries, mask=inside, other=0)
                add = tl.where(inside, 0.0, float("-inf"))
            else:
                slots = entries
                add = tl.load(bias + row * bias_row + slots, mask=inside, other=float("-inf")).to(tl.float32)
            at_slots = slots[:, None].to(tl.int64)
            keys = tl.load(k_base + at_slots * k_slot + dims[None, :], mask=inside[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(keys)) * (scale * log2e) + add[None, :] * log2e  # (GROUP_PAD, BLOCK)
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            rescale = tl.exp2(best - new_best)
            weights = tl.exp2(scores - new_best[:, None])
            total = total * rescale + tl.sum(weights, axis=1)
            values = tl.load(v_base + at_slots * v_slot + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
            best = new_best
        at = ((row * tl.num_programs(1) + head) * splits + split) * GROUP + rows
        tl.store(part_out + at[:, None] * D + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part_stats + at * 2, best, mask=row_ok)
        tl.store(part_stats + at * 2 + 1, total, mask=row_ok)

    @triton.jit(do_not_specialize=["splits"])
    def decode_attention_combine_kernel(  # type: ignore[no-untyped-def]
        part_out,
        part_stats,
        out,
        lse,
        splits,
        GROUP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        WRITE_LSE: tl.constexpr,
    ):
        # one program: one query head of one row; the chunks' partial sums rescaled to a running maximum;
        # with WRITE_LSE also the head's log2 of its softmax denominator (base-2 scores, bias included)
        row = tl.program_id(0).to(tl.int64)
        query_head = tl.program_id(1)
        heads = tl.num_programs(1)
        dims = tl.arange(0, D)
        first = (row * (heads // GROUP) + query_head // GROUP) * splits
        best = tl.max(tl.full((BLOCK_S,), -1.0e30, tl.float32), axis=0)
        norm = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
        weighted = tl.zeros((D,), tl.float32)
        for s0 in range(0, splits, BLOCK_S):
            index = s0 + tl.arange(0, BLOCK_S)
            inside = index < splits
            at = (first + index) * GROUP + query_head % GROUP
            maxima = tl.load(part_stats + at * 2, mask=inside, other=-1.0e30)
            sums = tl.load(part_stats + at * 2 + 1, mask=inside, other=0.0)
            parts = tl.load(part_out + at[:, None] * D + dims[None, :], mask=inside[:, None], other=0.0)
            new_best = tl.maximum(best, tl.max(maxima, axis=0))
            rescale = tl.exp2(best - new_best)
            scale = tl.exp2(maxima - new_best)
            norm = norm * rescale + tl.sum(scale * sums, axis=0)
            weighted = weighted * rescale + tl.sum(scale[:, None] * parts, axis=0)
            best = new_best
        tl.store(out + (row * heads + query_head) * D + dims, (weighted / norm).to(out.dtype.element_ty))
        if WRITE_LSE:
            tl.store(lse + row * heads + query_head, best + tl.log2(norm))

    return {
        "decode_attention_partial": decode_attention_partial_kernel,
        "decode_attention_combine": decode_attention_combine_kernel,
        "gemv": gemv_kernel,
        "add_rms_norm": add_rms_norm_kernel,
        "rotary_to_cache": rotary_to_cache_kernel,
        "silu_mul": silu_mul_kernel,
        "next_power_of_2": triton.next_power_of_2,
    }


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, *, wait: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) ``hidden`` (+ ``delta``) -> (the sum, its RMSNorm times ``weight``). ``delta`` is (B, D), or
    (P, B, D) float32: the slices of a split ``gemv``, summed in order and rounded to ``hidden``'s dtype."""
    if not triton_available(hidden.device):
        return add_rms_norm_torch(hidden, delta, weight, eps)
    if wait:
        wait_for_compiles()
    k = _build()
    b, n = hidden.shape
    out_x = torch.empty_like(hidden)
    out_h = torch.empty_like(hidden) if delta is not None else hidden
    k["add_rms_norm"][(b,)](
        hidden,
        delta if delta is not None else hidden,
        weight,
        out_h,
        out_x,
        n,
        eps,
        HAS_DELTA=delta is not None,
        PARTS=delta.shape[0] if delta is not None and delta.dim() == 3 else 0,
        BLOCK=k["next_power_of_2"](n),
    )
    return out_h, out_x


def rotary_to_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot: torch.Tensor,
    hq: int,
    hkv: int,
    *,
    wait: bool = True,
) -> torch.Tensor:
    """Rotary on the queries and keys of (B, (Hq + 2 Hkv) d) ``qkv``; keys and values stored at ``slot``
    of the (B, Hkv, L, d) cache; returns the (B, Hq, 1, d) queries. The kernel rounds as torch does for
    bf16 and float32; float16 takes the torch definition."""
    if not triton_available(qkv.device) or qkv.dtype not in (torch.bfloat16, torch.float32):
        return rotary_to_cache_torch(qkv, cos, sin, keys, values, slot, hq, hkv)
    if wait:
        wait_for_compiles()
    k = _build()
    b = qkv.shape[0]
    d = keys.shape[-1]
    q_out = torch.empty(b, hq, 1, d, dtype=qkv.dtype, device=qkv.device)
    k["rotary_to_cache"][(b, hq + hkv)](
        qkv,
        cos,
        sin,
        q_out,
        keys,
        values,
        slot,
        qkv.stride(0),
        keys.stride(1),
        keys.stride(0),
        HQ=hq,
        HKV=hkv,
        D=d,
        BF16=qkv.dtype == torch.bfloat16,
    )
    return q_out


def silu_mul(gate_up: torch.Tensor, *, wait: bool = True) -> torch.Tensor:
    """(B, 2F) -> (B, F): ``silu(gate) * up``."""
    if not triton_available(gate_up.device):
        return silu_mul_torch(gate_up)
    if wait:
        wait_for_compiles()
    k = _build()
    b, two_f = gate_up.shape
    f = two_f // 2
    out = torch.empty(b, f, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    k["silu_mul"][(b, (f + block - 1) // block)](gate_up, out, f, BLOCK=block)
    return out


def gemv_slices(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """How a split ``gemv`` cuts ``k`` columns into at most ``split_k`` slices of whole ``block_k`` blocks:
    (columns per slice, slices); only the last slice may be shorter."""
    blocks = -(-k // block_k)
    per_slice = -(-blocks // split_k) * block_k
    return per_slice, -(-k // per_slice)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    silu_input: bool = False,
    config: dict[str, int] | None = None,
    wait: bool = True,
) -> torch.Tensor:
    """(1, K) ``x`` (with ``silu_input``: (1, 2K) gate and up, the input being ``silu_mul(x)``) times the
    (N, K) row-major ``weight`` (+ (N,) ``bias``) -> (1, N), summed in float32, one row of the weight
    per lane group: a matrix-vector product that streams the weight once. One row only (batch 1).

    ``config["split_k"]`` > 1 (no bias): the columns are cut into that many slices, each summed by its
    own programs (more of them for a long K), and the result is the (P, 1, N) float32 slice sums, which
    ``add_rms_norm`` adds in order (the sum, rounded to ``x``'s dtype, is the product)."""
    if x.shape[0] != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv takes one contiguous row and a contiguous weight, got x {tuple(x.shape)}")
    settings = config or GEMV_CONFIG
    split = settings.get("split_k", 1) > 1
    if split and bias is not None:
        raise ValueError("a split gemv takes no bias")
    if not triton_available(x.device):
        product = torch.nn.functional.linear(silu_mul_torch(x) if silu_input else x, weight, bias)
        return product.float().unsqueeze(0) if split else product
    if wait:
        wait_for_compiles()
    k_ = _build()
    n, k = weight.shape
    block_n, block_k = settings["block_n"], settings["block_k"]
    k_per_split, parts = gemv_slices(k, block_k, settings["split_k"]) if split else (k, 1)
    if out is None:
        shape, dtype = ((parts, 1, n), torch.float32) if split else ((1, n), x.dtype)
        out = torch.empty(shape, dtype=dtype, device=x.device)
    k_["gemv"][((n + block_n - 1) // block_n, parts)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n,
        k,
        k_per_split,
        HAS_BIAS=bias is not None,
        SILU_INPUT=silu_input,
        EVEN_K=k % block_k == 0,
        SPLIT=split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=settings["num_warps"],
        num_stages=settings["num_stages"],
    )
    return out


# -- decode attention: one query per row over a static cache, split over the slots ---------------------

DECODE_ATTENTION_ENV = "DYCOKE_DECODE_ATTENTION"
"""``DYCOKE_DECODE_ATTENTION=sdpa`` keeps torch's SDPA for the decode step's attention (default: the
Triton kernels of ``split_attention``)."""

SPLIT_ATTENTION_CONFIG = {"block": 128, "per_sm": 2, "num_warps": 4, "num_stages": 2}
"""``split_attention``'s defaults: slots per iteration of the inner loop, programs per multiprocessor
(how finely the slots are cut), and Triton's launch settings; the fastest of 36 on four shapes (7B
heads, one row at 3.2k, 12.8k and 25.6k slots, eight rows at 3.2k: ``micro_split_attention.py --sweep``,
H200, ``benchmarks/results/split-attention-h200.json``)."""

_COMBINE_BLOCK = 32


def attention_splits(programs: int, length: int, sms: int, block: int = 64, per_sm: int = 2) -> tuple[int, int]:
    """How ``split_attention`` cuts ``length`` slots when ``programs`` (rows x key-value heads) programs
    cover each chunk, on a GPU of ``sms`` multiprocessors: (chunks, slots per chunk). About ``per_sm``
    programs per multiprocessor; a chunk is a whole number of ``block`` slots, and no chunk is empty."""
    blocks = max(1, -(-length // block))
    wanted = max(1, -(-per_sm * sms // max(programs, 1)))
    per_chunk = -(-blocks // wanted)
    return -(-blocks // per_chunk), per_chunk * block


@functools.cache
def _multiprocessors(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def split_attention_torch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """The definition ``split_attention`` computes, in float32: (B, Hq, 1, d) queries over (B, Hkv, L, d)
    keys and values (each key-value head shared by Hq / Hkv query heads), plus the additive (B, 1, 1, L)
    ``bias``, softmax scaled by ``scale`` -> (B, 1, Hq, d) in the query's dtype."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    q = query.float().reshape(b, hkv, hq // hkv, d)
    scores = (q @ key.float().transpose(-1, -2)) * scale + bias.float().reshape(b, 1, 1, -1)
    return (scores.softmax(-1) @ value.float()).reshape(b, 1, hq, d).to(query.dtype)


def split_attention_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``split_attention`` takes these tensors: one bf16/fp16 query per row on a CUDA device with
    Triton, a head size of 16-256 (a power of two), grouped heads, rows of keys, values and bias contiguous
    in their last dimension, an additive (B, 1, 1, L) bias, and ``DYCOKE_DECODE_ATTENTION`` not ``sdpa``."""
    b, hq, q_len, d = query.shape
    return (
        q_len == 1
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.dtype == query.dtype
        and value.dtype == query.dtype
        and bias.is_floating_point()
        and d in (16, 32, 64, 128, 256)
        and key.shape[0] == b
        and hq % key.shape[1] == 0
        and hq // key.shape[1] <= 64
        and value.shape == key.shape
        and bias.shape == (b, 1, 1, key.shape[2])
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == bias.stride(-1) == 1
        and triton_available(query.device)
        and os.environ.get(DECODE_ATTENTION_ENV, "triton") != "sdpa"
    )


def launch_split_attention(
    defined: dict[str, Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    splits: int,
    chunk: int,
    config: dict[str, int] | None = None,
    lse: torch.Tensor | None = None,
    attended: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``defined``'s two attention kernels (``define_kernels()``) over ``splits`` chunks of ``chunk``
    slots: the partial softmax of every chunk, then their combination -> (B, 1, Hq, d). ``lse``: a
    (B, Hq) float32 tensor that receives each head's log2 softmax denominator (``split_attention``).
    ``attended``: (index, counts) of ``attended_slots``: each row attends to its listed slots only, cut
    into ``splits`` chunks of its own length (``bias`` and ``chunk`` unused; ``gathered_attention``)."""
    settings = config or SPLIT_ATTENTION_CONFIG
    b, hq, _, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    group = hq // hkv
    device = query.device
    part_out = torch.empty(b * hkv * splits * group * d, dtype=torch.float32, device=device)
    part_stats = torch.empty(b * hkv * splits * group * 2, dtype=torch.float32, device=device)
    gather = attended is not None
    index, counts = attended if attended is not None else (bias, bias)
    defined["decode_attention_partial"][(b, hkv, splits)](
        query, key, value, bias, index, counts, part_out, part_stats,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), bias.stride(0), index.stride(0),
        length, chunk, splits, scale,
        GROUP=group, GROUP_PAD=max(16, defined["next_power_of_2"](group)), D=d, BLOCK=settings["block"],
        GATHER=gather, num_warps=settings["num_warps"], num_stages=settings["num_stages"],
    )  # fmt: skip
    out = torch.empty(b, 1, hq, d, dtype=query.dtype, device=device)
    defined["decode_attention_combine"][(b, hq)](
        part_out, part_stats, out, out if lse is None else lse, splits,
        GROUP=group, D=d, BLOCK_S=_COMBINE_BLOCK, WRITE_LSE=lse is not None, num_warps=4,
    )  # fmt: skip
    return out


def split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    *,
    config: dict[str, int] | None = None,
    wait: bool = True,
    lse: torch.Tensor | None = None,
    attended: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, Hq, 1, d) queries over a (B, Hkv, L, d) static cache with an additive (B, 1, 1, L) ``bias``
    -> (B, 1, Hq, d) (``split_attention_torch`` defines it; ``split_attention_applies`` says when it
    runs). Split over the slots in chunks (flash decoding), so that one row's few heads fill the GPU, and
    one compiled kernel pair serves every cache length: torch's SDPA on Hopper takes cuDNN, which plans
    anew for each length, 40 ms and more (``benchmarks/results/split-attention-h200.json``).

    ``lse``: a (B, Hq) float32 tensor to fill with each head's log2 softmax denominator, ``log2(sum_s
    2^(scores_s))`` over the scores in base 2 (``(q . k_s * scale + bias_s) * log2(e)``), which DyCoke's
    pruning reads its attention probabilities from (``dp_kernels.py``). ``attended``: the slots to read
    instead of the whole cache (``gathered_attention``)."""
    if wait:
        wait_for_compiles()
    settings = config or SPLIT_ATTENTION_CONFIG
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    splits, chunk = attention_splits(
        query.shape[0] * key.shape[1], key.shape[2], _multiprocessors(index), settings["block"], settings["per_sm"]
    )
    return launch_split_attention(_build(), query, key, value, bias, scale, splits, chunk, settings, lse, attended)


def attended_slots(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots a (B, 1, 1, L) additive bias of 0 and -inf lets each row attend to: (B, L) int32 slot
    numbers, each row's first ``counts[row]`` entries in ascending order (the rest unspecified), and the
    (B,) int32 counts. A handful of device ops, no host synchronisation (capturable in a CUDA graph)."""
    b, length = bias.shape[0], bias.shape[-1]
    allowed = bias.reshape(b, length) != float("-inf")
    counts = allowed.sum(dim=1, dtype=torch.int32)
    target = torch.where(allowed, allowed.cumsum(dim=1) - 1, length)  # the unattended into a spare column
    slots = torch.arange(length, dtype=torch.int32, device=bias.device).expand(b, length)
    index = torch.zeros(b, length + 1, dtype=torch.int32, device=bias.device).scatter_(1, target, slots)
    return index[:, :length], counts


def gathered_attention_torch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, scale: float
) -> torch.Tensor:
    """The definition ``gathered_attention`` computes: ``split_attention_torch`` with a bias of 0 at each
    row's listed slots (the first ``counts[row]`` of ``index``) and -inf elsewhere."""
    b, length = index.shape[0], key.shape[2]
    listed = torch.arange(index.shape[1], device=index.device) < counts[:, None].to(index.device)
    allowed = torch.zeros(b, length + 1, dtype=torch.bool, device=index.device)
    allowed.scatter_(1, torch.where(listed, index.long(), length), True)
    bias = torch.zeros(b, 1, 1, length, device=key.device).masked_fill(
        ~allowed[:, :length].reshape(b, 1, 1, length).to(key.device), float("-inf")
    )
    return split_attention_torch(query, key, value, bias, scale)


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attended: tuple[torch.Tensor, torch.Tensor],
    scale: float,
    *,
    config: dict[str, int] | None = None,
    wait: bool = True,
) -> torch.Tensor:
    """``split_attention`` over the slots ``attended`` (``attended_slots``: (B, L) index, (B,) counts) lists
    instead of the whole cache -> (B, 1, Hq, d) (``gathered_attention_torch`` defines it). DyCoke's later
    layers at a pruned step attend to about a third of a row's slots: this reads only those keys and
    values, where the masked cache reads every one. The same sums as the masked kernel, cut into other
    chunks. Shapes and conditions as ``split_attention``'s (``split_attention_applies``)."""
    unread = key.new_zeros(1)  # no bias: every listed slot is attended
    return split_attention(query, key, value, unread, scale, config=config, wait=wait, attended=attended)
