"""Turn what a method kept into a ``Trace`` (plain lists) for drawing; only called when asked for."""

from __future__ import annotations

import math
from typing import Any

import torch

from dycoke.methods.base import CompressedVisual, CompressionMethod
from dycoke.methods.dycoke import DyCoke
from dycoke.methods.fastv import FastV
from dycoke.report import Trace


def token_positions(visual: CompressedVisual, num_frames: int, tokens_per_frame: int) -> list[tuple[int, int]]:
    """(frame, patch) of each visual token in LLM order (raster order when the method did not say)."""
    n = visual.tokens.shape[0]
    if visual.frame_index is None or visual.patch_index is None:
        return [(i // tokens_per_frame, i % tokens_per_frame) for i in range(n)]
    return list(zip(visual.frame_index.tolist(), visual.patch_index.tolist(), strict=True))


def build_trace(
    method: CompressionMethod,
    visual: CompressedVisual,
    frames: Any,
    tokens_per_frame: int,
    sample: int,
    generated: int,
) -> Trace:
    """The trace of row ``sample`` of a batch that generated ``generated`` tokens."""
    num_frames = int(frames.shape[0])
    kept = token_positions(visual, num_frames, tokens_per_frame)
    trace = Trace(
        method=method.name,
        frames=frames,
        tokens_per_frame=tokens_per_frame,
        grid=math.isqrt(tokens_per_frame),
        kept=kept,
    )
    if isinstance(method, FastV) and method.session is not None and method.session.slots is not None:
        start = int(method.session.starts.reshape(-1)[sample])
        slots = method.session.slots[sample].tolist()
        trace.late_kept = [kept[s - start] for s in slots if start <= s < start + len(kept)]
        trace.late_layer = method.options.fastv_layer
    if isinstance(method, DyCoke) and method.state is not None and method.state.attention_history is not None:
        state = method.state
        steps = min(state.steps, max(generated - 1, 0))
        frame_of = torch.tensor([f for f, _ in kept[: state.num_candidates]], dtype=torch.long)
        history = state.attention_history
        assert history is not None
        attention = history[:steps, sample].cpu()  # (steps, n)
        keep = state.history[:steps, sample].cpu().float()
        per_frame = torch.zeros(steps, num_frames).index_add_(1, frame_of, attention)
        total = per_frame.sum(dim=1, keepdim=True).clamp(min=1e-12)
        trace.step_attention = (per_frame / total).tolist()
        trace.step_kept = torch.zeros(steps, num_frames).index_add_(1, frame_of, keep).long().tolist()
        trace.late_layer = method.options.prune_layer
    return trace
