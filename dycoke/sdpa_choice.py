"""Which fused kernel SDPA may take, for attention whose shape changes from one question to the next.

torch only (no transformers): the GPU warm-up (``dycoke.warmup``) uses it on a thread while
transformers' model code imports.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dycoke.switches import switch

CUDNN_PREFILL_ENV = "DYCOKE_CUDNN_PREFILL"
"""Set to 1 to let the prefill and the vision encoder use cuDNN attention again (see
``without_cudnn_attention``)."""

_CUDNN_OFF_LOCK = threading.Lock()
_CUDNN_OFF_BLOCKS = [0]  # blocks inside without_cudnn_attention, over all threads
_CUDNN_BEFORE = [True]  # torch's cuDNN attention flag before the first of them


@contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """SDPA from flash or memory-efficient attention, never cuDNN, for the block: where an attention's
    shape changes from one question to the next (a prompt's prefill, a follow-up's prefill after a
    cached prefix, transformers' ``generate``, a frame count's vision encoder).

    On Hopper, torch prefers cuDNN attention, which builds an execution plan for every new shape: 28
    prefill layers at a key length not seen before took 53 ms to 1.2 s against 4 to 24 ms without
    cuDNN (7B shape, H200, ``benchmarks/micro_sdpa_new_lengths.py``). A question of another length
    paid that each time, and a fresh process's first answer always did. Flash attention has no plans;
    it computes the same attention (other rounding in bf16). The decode step is not inside: its
    shapes repeat and it runs from a CUDA graph. ``DYCOKE_CUDNN_PREFILL=1`` leaves the choice to torch.

    torch's flag is process-wide: it stays off while any thread is inside such a block and is then
    restored to what it was before the first one.
    """
    if switch(CUDNN_PREFILL_ENV, default=False):
        yield
        return
    with _CUDNN_OFF_LOCK:
        if _CUDNN_OFF_BLOCKS[0] == 0:
            _CUDNN_BEFORE[0] = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _CUDNN_OFF_BLOCKS[0] += 1
    try:
        yield
    finally:
        with _CUDNN_OFF_LOCK:
            _CUDNN_OFF_BLOCKS[0] -= 1
            if _CUDNN_OFF_BLOCKS[0] == 0:
                torch.backends.cuda.enable_cudnn_sdp(_CUDNN_BEFORE[0])
