"""Shared-prefix prefill: the system prompt and video tokens are prefilled once per video and method,
and every question on that video continues from a copy of that KV cache.

Rows of a batch are laid out ``prefix | padding | question``: the padding sits between the shared
prefix and each question (the question part is left-padded), so every row keeps the prefix at the
same cache positions. ``generate`` derives position ids from the attention mask (cumulative sum),
so a padded row sees exactly the positions it would see alone; the mask hides the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache

from dycoke.sdpa_choice import without_cudnn_attention

# ``generate`` takes a ready cache as ``cache`` from transformers 5.24 on (``past_key_values`` before,
# deprecated since).
CACHE_ARGUMENT = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


@dataclass
class PrefixKV:
    """The KV cache of a prefix, one (keys, values) pair per layer, each (1, Hkv, P, d).

    ``unreported_s``: seconds its prefill added to the wall clock that no answer has reported yet (a
    prefix prefilled while the video was read, ``dycoke.stream_prefill``: the part after the read)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    length: int
    unreported_s: float = 0.0

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def prefill_prefix(model: Any, embeds: torch.Tensor) -> PrefixKV:
    """Run the language model over (1, P, D) prefix embeddings once and keep its KV cache."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    with without_cudnn_attention():
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_ARGUMENT)  # the output field has the same name as the argument
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return PrefixKV(layers=layers, length=int(embeds.shape[1]))


def expand_prefix(prefix: PrefixKV, batch: int, into: DynamicCache | None = None) -> DynamicCache:
    """A cache holding ``prefix`` for each of ``batch`` rows: ``into`` (an empty cache a method brings,
    e.g. FastV's or eviction's) or a fresh one. Generation appends to it in place, so every call gets
    its own."""
    cache = DynamicCache() if into is None else into
    for index, (keys, values) in enumerate(prefix.layers):
        cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
    return cache


@dataclass
class PaddedRows:
    """A batch of prompts laid out for ``generate``.

    Attributes:
        ids: (B, S) token ids, padding as ``pad_id``.
        attention_mask: (B, S), 0 at padding.
        visual_starts: (B,) cache position of each row's first visual token.
        lengths: unpadded length of each row.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    visual_starts: list[int]
    lengths: list[int]


def pad_rows(rows: list[list[int]], visual_start: int, prefix_length: int, pad_id: int) -> PaddedRows:
    """Left-pad each row's part after ``prefix_length`` (0: the whole row, plain left padding).

    ``visual_start`` is where the visual tokens start in an unpadded row; with a shared prefix it
    lies inside the prefix and does not move, otherwise it moves right by the row's padding.
    """
    width = max(len(r) for r in rows)
    ids, mask, starts = [], [], []
    for row in rows:
        pad = width - len(row)
        ids.append(row[:prefix_length] + [pad_id] * pad + row[prefix_length:])
        mask.append([1] * prefix_length + [0] * pad + [1] * (len(row) - prefix_length))
        starts.append(visual_start + (pad if visual_start >= prefix_length else 0))
    return PaddedRows(
        ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        visual_starts=starts,
        lengths=[len(r) for r in rows],
    )


def common_prefix_ok(rows: list[list[int]], prefix_length: int) -> bool:
    """Whether every row starts with the same ``prefix_length`` tokens and goes on after them."""
    first = rows[0][:prefix_length]
    return all(len(r) > prefix_length and r[:prefix_length] == first for r in rows)


def trim_generated(row: list[int], eos_ids: list[int]) -> list[int]:
    """A generated row up to and including its first end token (later entries are batch padding)."""
    for index, token in enumerate(row):
        if token in eos_ids:
            return row[: index + 1]
    return row
