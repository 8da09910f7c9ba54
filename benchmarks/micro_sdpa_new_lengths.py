"""What a new key length costs SDPA with a boolean mask: a prefill that continues a cached prefix.

A follow-up question attends, in every layer, to the cached prefix plus its own tokens: 20 queries,
about 3.2k keys, a boolean mask, 28 heads of 128. Each follow-up has a new key length. This times 28
such calls (one per layer of the 7B model) per new length, with torch's default backends (cuDNN
attention first on Hopper), then without cuDNN, then with the default again on lengths not seen yet:

    python benchmarks/micro_sdpa_new_lengths.py > benchmarks/results/sdpa-new-lengths-h200.txt
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def main() -> None:
    device = "cuda"
    q = torch.randn(1, 28, 20, 128, device=device, dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q)
    print("cudnn sdp enabled:", torch.backends.cuda.cudnn_sdp_enabled())
    rounds = [("default", None, 0), ("no-cudnn", WITHOUT_CUDNN, 0), ("default-again", None, 3)]
    for name, backends, shift in rounds:
        for length in (3200 + 7 * i + shift for i in range(5)):
            k = torch.randn(1, 28, length, 128, device=device, dtype=torch.bfloat16)
            mask = torch.ones(1, 1, 20, length, dtype=torch.bool, device=device)
            choice = torch._fused_sdp_choice(q, k, k, mask)  # the default choice (3: cuDNN)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(28):
                if backends is None:
                    F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
                else:
                    with sdpa_kernel(backends):
                        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
            torch.cuda.synchronize()
            elapsed_ms = 1000 * (time.perf_counter() - t)
            print(f"{name:14s} L={length} choice={choice} 28 calls {elapsed_ms:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
