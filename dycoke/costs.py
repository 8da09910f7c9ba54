"""The DyCoke paper's theoretical cost model (its Table 1), for the report and for checks.

With ``Ly`` layers, hidden size ``d``, FFN size ``m``, ``n`` visual tokens and ``R`` generated tokens:
prefill ``Ly * (4 n d^2 + 2 n^2 d + 2 n d m)``; decode ``Ly * R * ((4 d^2 + 2 d m) + 2 (d n + d (R+1)/2))``.
DyCoke prefills with ``n'`` tokens in every layer and decodes with ``n'`` in the first L layers and
``n' (1 - P)`` in the rest. The paper sets ``n' = (1 - 3K/4) n``; ``costs_tflops`` also takes the
exact merged count of a run. Text tokens are not counted, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlmShape:
    """The dimensions the cost model needs."""

    layers: int
    hidden: int
    ffn: int


PAPER_SHAPES = {
    "0.5b": LlmShape(layers=24, hidden=896, ffn=4864),
    "7b": LlmShape(layers=28, hidden=3584, ffn=18944),
    "72b": LlmShape(layers=80, hidden=8192, ffn=29568),
}


def prefill_flops(shape: LlmShape, n: float, layers: int | None = None) -> float:
    """FLOPs of prefilling ``n`` tokens through ``layers`` layers (all by default)."""
    d, m = shape.hidden, shape.ffn
    ly = shape.layers if layers is None else layers
    return ly * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def decode_flops(shape: LlmShape, n: float, generated: int, layers: int | None = None) -> float:
    """FLOPs of generating ``generated`` tokens attending to ``n`` visual tokens in ``layers`` layers."""
    d, m, r = shape.hidden, shape.ffn, generated
    ly = shape.layers if layers is None else layers
    return ly * r * ((4 * d * d + 2 * d * m) + 2 * (d * n + d * (r + 1) / 2))


def full_tflops(shape: LlmShape, n: float, generated: int = 100) -> float:
    """Prefill + decode with every visual token, in TFLOPs."""
    return (prefill_flops(shape, n) + decode_flops(shape, n, generated)) / 1e12


def dycoke_tflops(
    shape: LlmShape,
    merged: float,
    generated: int = 100,
    prune_layer: int = 3,
    prune_ratio: float = 0.7,
    pruned_share: float = 1.0,
) -> float:
    """Prefill with ``merged`` tokens, decode with ``merged`` in layers < L and, at the ``pruned_share``
    of the steps that DP pruned, ``merged (1-P)`` after (``merged`` at the others; the paper's formula
    prunes every step: share 1)."""
    late_layers = shape.layers - prune_layer
    early = decode_flops(shape, merged, generated, layers=prune_layer)
    pruned = decode_flops(shape, merged * (1 - prune_ratio), generated, layers=late_layers)
    unpruned = decode_flops(shape, merged, generated, layers=late_layers)
    late = pruned_share * pruned + (1 - pruned_share) * unpruned
    return (prefill_flops(shape, merged) + early + late) / 1e12


def paper_merged_tokens(n: float, merge_ratio: float) -> float:
    """The paper's count of tokens after TTM: ``(1 - 3K/4) n``."""
    return (1 - 3 * merge_ratio / 4) * n


def fastv_tflops(shape: LlmShape, n: float, kept: float, generated: int, layer: int) -> float:
    """FastV: every layer below K sees ``n`` visual tokens, in prefill and decode; layers >= K see ``kept``."""
    late = shape.layers - layer
    early_flops = prefill_flops(shape, n, layers=layer) + decode_flops(shape, n, generated, layers=layer)
    late_flops = prefill_flops(shape, kept, layers=late) + decode_flops(shape, kept, generated, layers=late)
    return (early_flops + late_flops) / 1e12
