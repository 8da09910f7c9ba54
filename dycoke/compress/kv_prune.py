"""DyCoke stage II: dynamic pruning of the visual KV cache at every decoding step (math only).

At each decode step the new token's attention at layer L-1, averaged over all query heads, is sliced
to the visual span; if its cosine similarity with the previous step's vector is below the gate
threshold, layers L.. attend only to the top ``int(n * (1 - P))`` visual positions (plus every
non-visual position). The cache itself is never shrunk, and positions are never renumbered: a pruned
step is a boolean mask over the full K/V, so a token dropped at step t can come back at t+1.

Everything here runs on the device, batched (one keep set per sample), with no host synchronisation.
This is the definition; on the CUDA-graph decoder in bf16/fp16 a step computes it with two Triton kernels
(``dycoke/decoding/dp_kernels.py``, tested against these functions).
Shapes: B batch, Hq query heads, Hkv key/value heads, S key length, d head dim, n visual candidates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

GateMode = Literal["official", "reuse"]


def head_mean_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of one new query over all keys, averaged over query heads.

    Args:
        query: (B, Hq, 1, d) the new token's queries (rotary already applied).
        key: (B, Hkv, S, d) every cached key; Hq must be a multiple of Hkv (GQA keys are shared).
        scaling: the softmax scale (1/sqrt(d)).
        mask: optional (B, 1, 1, S) or (B, S) boolean (True = may attend) or additive float mask.

    Returns:
        (B, S) float32 probabilities, mean over the Hq heads of softmax(q K^T * scaling).
    """
    b, hq, q_len, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    if q_len != 1:
        raise ValueError(f"expected one new query, got {q_len}")
    q = query.reshape(b, hkv, hq // hkv, d).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, Hkv, G, S)
    if mask is not None:
        m = mask.reshape(mask.shape[0], 1, 1, s)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def span_indices(starts: torch.Tensor, length: int) -> torch.Tensor:
    """(B,) first positions -> (B, length) positions of each sample's visual span."""
    return starts.reshape(-1, 1) + torch.arange(length, device=starts.device).reshape(1, -1)


def gate_similarity(current: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Cosine similarity per sample between this and the previous step's visual attention.

    Args:
        current, previous: (B, n). ``previous`` None (first step of a sample) gives similarity 0.

    Returns:
        (B,) float32.
    """
    if previous is None:
        return torch.zeros(current.shape[0], device=current.device)
    return torch.nn.functional.cosine_similarity(current.float(), previous.float(), dim=-1)


def top_keep(visual_attention: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, n) attention -> (B, n) boolean mask of the ``keep`` most attended positions per sample."""
    b, n = visual_attention.shape
    kept = torch.zeros(b, n, dtype=torch.bool, device=visual_attention.device)
    if keep > 0:
        # unsorted: the same set, without sorting it (on a GPU the sort took as long as the selection)
        kept.scatter_(1, visual_attention.topk(keep, dim=-1, sorted=False).indices, True)
    return kept


def surviving_slots(span: torch.Tensor, kept: torch.Tensor, length: int) -> torch.Tensor:
    """The slots of a ``length``-slot sequence still stored once the span's unkept positions are dropped.

    Args:
        span: (B, n) slots of each row's candidates; kept: (B, n) bool, the same count per row.

    Returns:
        (B, length - n + kept per row) long, ascending: every slot outside the span and the kept ones.
    """
    survive = torch.ones(span.shape[0], length, dtype=torch.bool, device=span.device)
    survive.scatter_(1, span, kept)
    return survive.nonzero()[:, 1].reshape(span.shape[0], -1)


def keep_count(num_candidates: int, prune_ratio: float) -> int:
    """Visual positions kept at a pruned step: ``int(n * (1 - P))``, as the reference code computes it."""
    return int(num_candidates * (1 - prune_ratio))


@dataclass
class PruneState:
    """Per-run state of stage II, reset for every sample (the reference code does not: a bug).

    Everything that lives from one decode step to the next is a device buffer updated in place
    (previous attention, last keep set, per-step history, step counter), so a decode step can be
    captured once as a CUDA graph and replayed: the replay updates the same buffers.

    Attributes:
        starts: (B,) position of each sample's first visual token in the KV cache (left padding
            included), on the model's device.
        num_candidates: n, visual positions that can be pruned (the reference's N - 1).
        keep: visual positions kept at a pruned step.
        threshold: gate threshold on the cosine similarity.
        mode: "official" prunes nothing at a step whose similarity reaches the threshold; "reuse"
            keeps the previous selection at such a step.
        max_steps: decode steps the history has room for (the longest answer).
    """

    starts: torch.Tensor
    num_candidates: int
    keep: int
    threshold: float = 0.9
    mode: GateMode = "official"
    max_steps: int = 1024
    record_attention: bool = False
    attention_history: torch.Tensor | None = field(init=False, default=None)  # (max_steps, B, n) if recorded
    previous: torch.Tensor = field(init=False)  # (B, n) float32, zeros before the first step (similarity 0)
    kept: torch.Tensor = field(init=False)  # (B, n) bool, this step's keep set (all True before the first)
    history: torch.Tensor = field(init=False)  # (max_steps, B, n) bool, every step's keep set
    step: torch.Tensor = field(init=False)  # () long, decode steps seen
    span: torch.Tensor = field(init=False)  # (B, n) KV positions of each sample's candidates

    def __post_init__(self) -> None:
        b, n, device = self.starts.shape[0], self.num_candidates, self.starts.device
        self.span = span_indices(self.starts, n)
        self.previous = torch.zeros(b, n, dtype=torch.float32, device=device)
        self.kept = torch.ones(b, n, dtype=torch.bool, device=device)
        self.history = torch.zeros(max(self.max_steps, 1), b, n, dtype=torch.bool, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)
        if self.record_attention:
            self.attention_history = torch.zeros(max(self.max_steps, 1), b, n, dtype=torch.float32, device=device)

    def update(self, visual_attention: torch.Tensor) -> torch.Tensor:
        """Take this step's (B, n) visual attention; decide and return the (B, n) keep mask.

        A handful of device ops writing into the state's buffers, no host synchronisation. The cosine
        with the zero buffer of the first step is exactly 0, as with no previous step at all.
        """
        prune = (gate_similarity(visual_attention, self.previous) < self.threshold).unsqueeze(1)  # (B, 1)
        selected = top_keep(visual_attention, self.keep)
        if self.mode == "reuse":
            kept = torch.where(prune, selected, self.kept)  # before any selection: all kept
        else:
            kept = selected | ~prune  # a step that does not prune keeps everything
        self.previous.copy_(visual_attention)
        self.kept.copy_(kept)
        slot = self.step.clamp(max=self.history.shape[0] - 1).reshape(1)
        self.history.index_copy_(0, slot, kept.unsqueeze(0))
        if self.attention_history is not None:
            self.attention_history.index_copy_(0, slot, visual_attention.float().unsqueeze(0))
        self.step.add_(1)
        return self.kept

    def rows(self, start: int, stop: int) -> PruneState:
        """The state of rows ``start..stop`` alone, for decoding part of the batch: its (b, ...) buffers
        are views of this state's, so its steps write into them; its step counter is its own (every
        part runs the same steps: copy one part's counter back with ``step.copy_`` after them)."""
        part = copy.copy(self)
        part.starts, part.span = self.starts[start:stop], self.span[start:stop]
        part.previous, part.kept = self.previous[start:stop], self.kept[start:stop]
        part.history = self.history[:, start:stop]
        if self.attention_history is not None:
            part.attention_history = self.attention_history[:, start:stop]
        part.step = self.step.clone()
        return part

    @property
    def steps(self) -> int:
        """Decode steps seen (reads the device counter)."""
        return min(int(self.step.item()), self.history.shape[0])

    def pruned_steps(self, steps: int | None = None) -> torch.Tensor:
        """(B,) decode steps that pruned, per sample, over the first ``steps`` steps (default all)."""
        history = self.history[: self.steps if steps is None else steps]
        return (~history.all(dim=-1)).sum(dim=0)

    def attended_sum(self, steps: int | None = None) -> torch.Tensor:
        """(B,) candidates attended by layers >= L, summed over the first ``steps`` steps (default all)."""
        return self.history[: self.steps if steps is None else steps].sum(dim=(0, 2))

    def full_mask(self, kv_length: int) -> torch.Tensor:
        """(B, kv_length) boolean mask for layers >= L: False only at pruned visual positions."""
        assert self.kept is not None
        mask = torch.ones(self.kept.shape[0], kv_length, dtype=torch.bool, device=self.kept.device)
        return mask.scatter_(1, self.span, self.kept)

    def later_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, L) additive bias of this step -> the one layers >= L attend through: -inf added at
        the pruned visual positions (what ``dp_kernels.launch_decide`` writes)."""
        b, length = bias.shape[0], bias.shape[-1]
        return bias.masked_fill(~self.full_mask(length).view(b, 1, 1, length), float("-inf"))

    def visual_attention(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(B, S) head-mean probabilities -> (B, n) on each sample's visual candidates."""
        return probabilities.gather(1, self.span)
