"""Checks of the fused step's Triton kernels under Triton's interpreter, run as
``TRITON_INTERPRET=1 python -m tests.interpreted_kernels`` (``test_fused_step`` does): CPU tensors,
no GPU. The interpreter's float -> bf16 conversions truncate, so only integer-rounded results (the
rotary kernel's bf16 path) and float32 are compared."""

from __future__ import annotations

import os

import torch

from dycoke.decoding import dp_kernels, kernels


def check_rotary(defined: dict, dtype: torch.dtype, b: int, hq: int, hkv: int, d: int) -> None:
    torch.manual_seed(b + d)
    length = 9
    qkv = (torch.randn(b, (hq + 2 * hkv) * d) * 3).to(dtype)
    angles = torch.rand(b, d // 2) * 40
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    keys = torch.zeros(b, hkv, length, d, dtype=dtype)
    values = torch.zeros_like(keys)
    keys_ref, values_ref = keys.clone(), values.clone()
    slot = torch.tensor(length - 2).view(1)
    q = torch.empty(b, hq, 1, d, dtype=dtype)
    defined["rotary_to_cache"][(b, hq + hkv)](
        qkv, cos, sin, q, keys, values, slot, qkv.stride(0), keys.stride(1), keys.stride(0),
        HQ=hq, HKV=hkv, D=d, BF16=dtype == torch.bfloat16,
    )  # fmt: skip
    q_ref = kernels.rotary_to_cache_torch(qkv, cos, sin, keys_ref, values_ref, slot, hq, hkv)
    assert torch.equal(q, q_ref), (dtype, b, hq, d, float((q != q_ref).float().mean()))
    assert torch.equal(keys, keys_ref) and torch.equal(values, values_ref), (dtype, b, hq, d)


def check_norm_and_activation(defined: dict) -> None:
    hidden, delta, weight = torch.randn(2, 100), torch.randn(2, 100), torch.randn(100)
    for has_delta in (True, False):
        out_h, out_x = torch.empty_like(hidden), torch.empty_like(hidden)
        defined["add_rms_norm"][(2,)](
            hidden, delta, weight, out_h, out_x, 100, 1e-6, HAS_DELTA=has_delta, PARTS=0, BLOCK=128
        )
        h_ref, x_ref = kernels.add_rms_norm_torch(hidden, delta if has_delta else None, weight, 1e-6)
        assert torch.allclose(out_x, x_ref, rtol=1e-5, atol=1e-6)
        assert not has_delta or torch.equal(out_h, h_ref)
    parts = torch.randn(3, 2, 100)  # a split projection's float32 slices, added in order
    out_h, out_x = torch.empty_like(hidden), torch.empty_like(hidden)
    defined["add_rms_norm"][(2,)](hidden, parts, weight, out_h, out_x, 100, 1e-6, HAS_DELTA=True, PARTS=3, BLOCK=128)
    h_ref, x_ref = kernels.add_rms_norm_torch(hidden, parts, weight, 1e-6)
    assert torch.equal(out_h, h_ref) and torch.allclose(out_x, x_ref, rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(2, 2 * 1500)
    out = torch.empty(2, 1500)
    defined["silu_mul"][(2, 2)](gate_up, out, 1500, BLOCK=1024)
    assert torch.allclose(out, kernels.silu_mul_torch(gate_up), rtol=1e-5, atol=1e-6)


def check_gemv(defined: dict) -> None:
    torch.manual_seed(3)
    cases = ((37, 96, True, False, 32, 1), (20, 100, False, True, 32, 1), (16, 64, False, False, 64, 1))
    cases += ((20, 100, False, True, 32, 2), (19, 256, False, True, 32, 3))  # split: ragged, then even slices
    for n, k, bias, silu, block_k, split in cases:
        x = torch.randn(1, 2 * k if silu else k)
        weight, b = torch.randn(n, k), torch.randn(n)
        k_per_split, parts = kernels.gemv_slices(k, block_k, split)
        out = torch.empty(parts, 1, n)
        defined["gemv"][((n + 7) // 8, parts)](
            x, weight, b, out, n, k, k_per_split, HAS_BIAS=bias, SILU_INPUT=silu, EVEN_K=k % block_k == 0,
            SPLIT=split > 1, BLOCK_N=8, BLOCK_K=block_k,
        )  # fmt: skip
        expected = torch.nn.functional.linear(kernels.silu_mul_torch(x) if silu else x, weight, b if bias else None)
        assert torch.allclose(out.sum(dim=0), expected, rtol=1e-5, atol=1e-4), (n, k, bias, silu, split)


def check_split_attention(defined: dict) -> None:
    """Float32 against the definition: grouped heads (one padded up to 16 rows), chunks ending mid-block,
    a last block past the cache's end, masked slots, and a chunk whose every slot is masked."""
    torch.manual_seed(5)
    cases = ((2, 6, 2, 16, 150, 3, 64, 64), (1, 4, 4, 32, 70, 2, 64, 64), (2, 6, 2, 16, 150, 2, 96, 32))
    for b, hq, hkv, d, length, splits, chunk, block in cases:  # the last: three iterations per chunk
        query = torch.randn(b, hq, 1, d)
        key, value = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        allowed = torch.rand(b, length) < 0.6
        allowed[:, -1] = True
        allowed[0, :64] = False  # row 0's first chunk sees nothing
        bias = torch.zeros(b, 1, 1, length).masked_fill_(~allowed.view(b, 1, 1, length), float("-inf"))
        config = {**kernels.SPLIT_ATTENTION_CONFIG, "block": block}
        got = kernels.launch_split_attention(defined, query, key, value, bias, d**-0.5, splits, chunk, config)
        expected = kernels.split_attention_torch(query, key, value, bias, d**-0.5)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (b, hq, hkv, d, float((got - expected).abs().max()))


def check_gathered_attention(defined: dict) -> None:
    """Float32: only the listed slots read (the others hold NaN), rows of different counts, chunks of a
    row's own length ending mid-block, and splits left empty by a short row."""
    torch.manual_seed(6)
    for b, hq, hkv, d, length, splits, block in ((3, 6, 2, 16, 150, 3, 32), (2, 4, 4, 32, 70, 8, 16)):
        query = torch.randn(b, hq, 1, d)
        key, value = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
        allowed = torch.rand(b, length) < 0.4
        allowed[:, -1] = True
        allowed[-1, :-3] = False  # a row of three slots: most splits get nothing
        bias = torch.zeros(b, 1, 1, length).masked_fill_(~allowed.view(b, 1, 1, length), float("-inf"))
        attended = kernels.attended_slots(bias)
        hidden = ~allowed[:, None, :, None].expand_as(key)
        key_nan, value_nan = key.masked_fill(hidden, float("nan")), value.masked_fill(hidden, float("nan"))
        config = {**kernels.SPLIT_ATTENTION_CONFIG, "block": block}
        got = kernels.launch_split_attention(
            defined, query, key_nan, value_nan, bias, d**-0.5, splits, 0, config, attended=attended
        )
        expected = kernels.split_attention_torch(query, key, value, bias, d**-0.5)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (b, hq, d, float((got - expected).abs().max()))
    # the public entry (its cut into chunks as on a GPU of 4 multiprocessors) on the last case
    real = kernels._multiprocessors, torch.cuda.current_device
    kernels._multiprocessors, torch.cuda.current_device = (lambda index: 4), (lambda: 0)  # type: ignore[assignment]
    try:
        got = kernels.gathered_attention(query, key_nan, value_nan, attended, d**-0.5, config=config)
    finally:
        kernels._multiprocessors, torch.cuda.current_device = real  # type: ignore[assignment]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), float((got - expected).abs().max())


def check_dp(defined: dict, defined_dp: dict) -> None:
    """DyCoke's pruning kernels against the torch definition (``PruneState.update``, ``head_mean_attention``,
    ``full_mask``), float32: the head-mean probabilities on the candidates; then several steps of the gate,
    the top-k, the state's buffers and the later layers' bias, in both gate modes, two rows."""
    from dycoke.compress.kv_prune import PruneState, head_mean_attention

    torch.manual_seed(7)
    b, hq, hkv, d, length = 2, 6, 2, 16, 150
    query, key, value = torch.randn(b, hq, 1, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    bias = torch.zeros(b, 1, 1, length)
    bias[1, ..., :7] = float("-inf")  # row 1's left padding
    bias[..., 140:] = float("-inf")  # slots not written yet
    starts, n = torch.tensor([10, 17]), 100
    lse = torch.empty(b, hq)
    kernels.launch_split_attention(defined, query, key, value, bias, d**-0.5, 2, 96, lse=lse)
    got = dp_kernels.launch_visual_attention(defined_dp, query, key, bias, lse, starts, n, d**-0.5)
    span = starts[:, None] + torch.arange(n)
    expected = head_mean_attention(query, key, d**-0.5, bias).gather(1, span)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8), float((got - expected).abs().max())

    for mode in ("official", "reuse"):
        ours = PruneState(starts=starts, num_candidates=n, keep=37, threshold=0.9, mode=mode, max_steps=4)  # type: ignore[arg-type]
        reference = PruneState(starts=starts, num_candidates=n, keep=37, threshold=0.9, mode=mode, max_steps=4)  # type: ignore[arg-type]
        step_bias = bias.clone()
        attention = torch.rand(b, n)
        for step in range(6):  # past the history's 4 slots: the last is overwritten, as index_copy_ does
            if step in (2, 3):  # close to the previous step: the gate keeps everything (or the old selection)
                attention = attention + 0.01 * torch.rand(b, n)
            else:
                attention = torch.rand(b, n)
            listed = (torch.full((b, length), -1, dtype=torch.int32), torch.full((b,), -1, dtype=torch.int32))
            later = dp_kernels.launch_decide(defined_dp, ours, attention, step_bias, listed)
            kept = reference.update(attention.clone())
            index, counts = kernels.attended_slots(later)
            assert torch.equal(listed[1], counts), (mode, step)
            assert all(torch.equal(listed[0][r, : int(c)], index[r, : int(c)]) for r, c in enumerate(counts))
            assert torch.equal(ours.kept, kept), (mode, step)
            assert torch.equal(ours.previous, reference.previous) and torch.equal(ours.history, reference.history)
            assert int(ours.step) == int(reference.step) == step + 1
            assert torch.equal(later, reference.later_bias(step_bias)), (mode, step)
        # the history's last slot holds step 5's; steps 2 and 3 did not prune (under "reuse" they kept the old set)
        assert ours.pruned_steps().tolist() == reference.pruned_steps().tolist() == [[3, 3], [4, 4]][mode == "reuse"]

    # ties at the keep-th value: the first positions among them; and keep 0 keeps no candidate
    state = PruneState(starts=starts[:1], num_candidates=8, keep=3, max_steps=2)
    attention = torch.tensor([[0.1, 0.5, 0.2, 0.2, 0.0, 0.2, 0.2, 0.05]])
    dp_kernels.launch_decide(defined_dp, state, attention, bias[:1])
    assert state.kept.tolist() == [[False, True, True, True, False, False, False, False]]
    for keep in (1, 7, 50, 99, 100):  # many ties (20 levels), zeros among them
        attention = torch.randint(0, 20, (1, 100)).float() / 20
        state = PruneState(starts=starts[:1], num_candidates=100, keep=keep, max_steps=2)
        dp_kernels.launch_decide(defined_dp, state, attention, bias[:1])
        value = attention[0].sort(descending=True).values[keep - 1]
        above, tied = attention[0] > value, attention[0] == value
        expected = above | (tied & (tied.cumsum(0) <= keep - int(above.sum())))
        assert torch.equal(state.kept[0], expected), keep
    empty = PruneState(starts=starts[:1], num_candidates=8, keep=0, max_steps=2)
    later = dp_kernels.launch_decide(defined_dp, empty, attention, bias[:1])
    hidden = torch.isinf(later[0, 0, 0])
    assert not empty.kept.any() and hidden[10:18].all() and not hidden[:10].any()


CANNOT_LOOP = 3
"""Exit status when this Triton's interpreter cannot run a loop whose bounds are kernel arguments (3.6
with numpy 2 turns scalar arguments into one-element arrays, which ``range`` refuses)."""


def interpreter_runs_loops() -> bool:
    import triton
    import triton.language as tl

    @triton.jit
    def count(out, n):  # type: ignore[no-untyped-def]
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count[(1,)](out, 3)
    except Exception as exc:  # the interpreter's InterpreterError wraps numpy's TypeError
        if "0-dimensional" in repr(exc):
            return False
        raise
    return int(out) == 3


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    if not interpreter_runs_loops():
        print("this Triton's interpreter cannot run loops with argument bounds")
        raise SystemExit(CANNOT_LOOP)
    defined = kernels.define_kernels()
    for dtype in (torch.bfloat16, torch.float32):
        for shape in ((1, 1, 1, 8), (3, 28, 4, 128)):
            check_rotary(defined, dtype, *shape)
    check_norm_and_activation(defined)
    check_gemv(defined)
    check_split_attention(defined)
    check_gathered_attention(defined)
    check_dp(defined, dp_kernels.define_dp_kernels())
    print("all kernels agree")


if __name__ == "__main__":
    main()
