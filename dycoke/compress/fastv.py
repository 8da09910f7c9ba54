"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024), math only.

During prefill, at layer K-1 the attention of the **last prompt token**, averaged over heads, ranks the
visual tokens (the authors' code does this: ``last_layer_attention_avg[-1]``; the paper words it as the
attention the tokens receive on average). The top ``keep`` visual tokens survive; the others are dropped
from layer K on, for the rest of prefill and for every decode step: their keys and values are not
stored for those layers, and nobody attends to them there. Positions are never renumbered (the
authors' ``keep_indexs`` become the position ids). Layers below K see every token.

Dropping a token's hidden state from layers >= K (the authors' "inplace" variant) and hiding its key
from every query of those layers (their "attention mask" variant) give the same outputs for every kept
token; the glue (``dycoke/hooks.py``) does the latter for prefill and stores only the kept entries.

Shapes: B batch, S prompt length (slots), n visual tokens per sample (the newline token included:
the whole visual run is ranked), ``keep`` kept per sample.
"""

from __future__ import annotations

import torch

from dycoke.compress.kv_prune import span_indices, surviving_slots, top_keep


def fastv_keep_count(num_visual: int, keep_ratio: float) -> int:
    """Visual tokens FastV keeps: ``round(n * keep_ratio)`` (the authors' ``round(n * (1 - R))``), >= 1."""
    return max(1, min(num_visual, round(num_visual * keep_ratio)))


def kept_slots(last_token_attention: torch.Tensor, starts: torch.Tensor, num_visual: int, keep: int) -> torch.Tensor:
    """The prompt slots that survive from layer K on, ascending.

    Args:
        last_token_attention: (B, S) head-mean attention probabilities of each row's last token.
        starts: (B,) slot of each row's first visual token.
        num_visual: n, the visual run's length.
        keep: visual tokens kept per row.

    Returns:
        (B, S - n + keep) long: every non-visual slot and the ``keep`` best-ranked visual slots, sorted.
    """
    span = span_indices(starts, num_visual)  # (B, n)
    kept = top_keep(last_token_attention.gather(1, span), keep)
    return surviving_slots(span, kept, last_token_attention.shape[1])
