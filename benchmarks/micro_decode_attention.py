"""Micro-benchmark: one decode step's attention at the 7B shape, by SDPA backend and mask kind (CUDA).

    python benchmarks/micro_decode_attention.py

Times (CUDA events, mean of 2000 calls after warm-up) the attention of one new query against S cached
keys with 28 query / 4 KV heads (head dim 128, bf16): unmasked (the uncompressed path) and with a DP
keep mask as a boolean or an additive bias, per backend. Used to choose how layers >= L attend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters: int = 2000) -> float:
    for _ in range(50):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters  # microseconds


def measure(s: int, hq: int = 28, hkv: int = 4, d: int = 128) -> None:
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    keep = torch.rand(1, 1, 1, s, device="cuda") < 0.3
    storage = torch.zeros(1, 1, 1, s + (-s) % 16, device="cuda", dtype=torch.bfloat16)
    bias = storage[..., :s].masked_fill_(~keep, float("-inf"))
    grouped = q.reshape(1, hkv, hq // hkv, d)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    rows = {
        "unmasked, enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "unmasked, grouped": lambda: F.scaled_dot_product_attention(grouped, k, v),
        "unmasked, repeat_kv": lambda: F.scaled_dot_product_attention(q, kr, vr),
    }
    for name, backend in [
        ("default", None),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("math", SDPBackend.MATH),
    ]:
        for kind, mask in (("bias", bias), ("bool", keep)):

            def call(mask=mask, backend=backend) -> torch.Tensor:
                if backend is None:
                    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)

            rows[f"grouped + {kind}, {name}"] = call

    rows["repeat_kv + bias, default"] = lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias)
    rows["repeat_kv + bool, default"] = lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=keep)
    rows["enable_gqa + bias, default"] = lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, enable_gqa=True
    )
    rows["enable_gqa + bool, default"] = lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=keep, enable_gqa=True
    )
    kept_index = keep.reshape(-1).nonzero().reshape(-1)

    def gathered() -> torch.Tensor:  # fixed-size index known in advance: gather kept K/V, then no mask
        kg, vg = k.index_select(2, kept_index), v.index_select(2, kept_index)
        return F.scaled_dot_product_attention(q, kg, vg, enable_gqa=True)

    rows["gather kept K/V + unmasked enable_gqa"] = gathered

    def manual() -> torch.Tensor:
        scores = torch.matmul(grouped, k.transpose(-1, -2)) * d**-0.5 + bias
        return torch.matmul(scores.softmax(-1), v)

    rows["grouped + bias, manual matmul/softmax"] = manual
    print(f"S = {s}")
    for name, fn in rows.items():
        try:
            print(f"  {name:45s} {bench(fn):8.1f} us")
        except RuntimeError as exc:
            print(f"  {name:45s} unsupported ({str(exc).splitlines()[0][:60]})")


def main() -> None:
    torch.manual_seed(0)
    for s in (3162, 6336):
        measure(s)


if __name__ == "__main__":
    main()
