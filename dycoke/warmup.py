"""Pay a process's one-time GPU library costs off the critical path.

The first answer in a fresh process was 1.84 s against 0.73 s for the second (7B, H200,
``benchmarks/bench_cold.py``): its vision encoder, compression and prefill ran 0.2-0.4 s slower each.
Much of that is per process, not per shape: cuDNN's libraries load and its handle is created at the
first convolution, cuBLAS and cuBLASLt create their handles and workspaces at the first matmul, the
fused attention kernels load at the first ``scaled_dot_product_attention``. ``warm_gpu_libraries`` makes
those first calls on tiny tensors, on a thread that runs while the model code imports or the model
builds (the GPU is idle then), in the ops and layouts the answer uses: a strided convolution on a
channels-last input (SigLIP's patch embedding), matmuls with and without bias, attention without a
mask and causal (without cuDNN, as the prefill and the vision encoder run them), and grouped-query with
an additive mask (the decode step's), layer norm, tanh-GELU, SiLU, softmax, top-k
and a channels-last bilinear resize. Nothing it computes is kept.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from dycoke.sdpa_choice import without_cudnn_attention

_STARTED: dict[tuple[torch.device, torch.dtype], threading.Thread] = {}
_LOCK = threading.Lock()


def warm_gpu_libraries(device: torch.device, dtype: torch.dtype) -> None:
    """First calls of the GPU libraries the answer uses, on tiny tensors of ``dtype`` on ``device``."""
    with torch.inference_mode(), torch.cuda.device(device):
        x = torch.randn(2, 3, 28, 28, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(16, 3, 14, 14, device=device, dtype=dtype)
        F.conv2d(x, weight, torch.zeros(16, device=device, dtype=dtype), stride=14)
        a = torch.randn(64, 64, device=device, dtype=dtype)
        F.linear(a, a, a[0])
        F.linear(a[:1], a)
        a @ a
        q = torch.randn(1, 4, 32, 64, device=device, dtype=dtype)
        kv = torch.randn(1, 2, 32, 64, device=device, dtype=dtype)
        with without_cudnn_attention():  # as the prefill and the vision encoder run
            F.scaled_dot_product_attention(q, q, q)
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        mask = torch.zeros(1, 1, 32, 32, device=device, dtype=dtype)
        F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)
        F.gelu(F.layer_norm(a, (64,)), approximate="tanh")
        F.silu(a).float().softmax(-1).topk(8, dim=-1)
        grid = a.view(1, 8, 8, 64).permute(0, 3, 1, 2)  # channels-last view, as ``vision`` pools
        F.interpolate(grid, size=[4, 4], mode="bilinear")
        torch.cuda.synchronize(device)


def start_warming(device: torch.device, dtype: torch.dtype) -> threading.Thread | None:
    """``warm_gpu_libraries`` on a daemon thread, once per device and dtype (later calls return the
    first thread); None off CUDA. A failure there changes nothing: the answer pays the costs instead."""
    if device.type != "cuda":
        return None
    with _LOCK:
        key = (device, dtype)
        if key not in _STARTED:

            def warm() -> None:
                with contextlib.suppress(Exception):
                    warm_gpu_libraries(device, dtype)

            _STARTED[key] = threading.Thread(target=warm, name="dycoke-warm-gpu", daemon=True)
            _STARTED[key].start()
        return _STARTED[key]
