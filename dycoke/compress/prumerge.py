"""LLaVA-PruMerge and PruMerge+ (Shang et al. 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient
Large Multimodal Models"), adapted to per-frame video tokens. Math only; this module imports torch only.

Input: F frames of T tokens each (T = 196 for LLaVA-OneVision, a 14x14 grid):

- ``scores`` ``(F, T)``: per-token "class attention" surrogate, computed by the caller (values >= 0,
  like softmax probabilities);
- ``keys`` ``(F, T, C)``: per-token keys, used for similarity only;
- ``features`` ``(F, T, D)``: the tokens that are kept and merged.

Each frame plays the part of one image of the authors' batch (``token_prune_merge_advanced`` and
``..._plus`` in their CLIP encoder). The algorithm, exactly:

1. Adaptive ratio (IQR outlier rule) over **all** ``F*T`` scores together, as the reference flattens its
   whole batch: ``Q1``, ``Q3`` = 25th and 75th percentiles with linear interpolation (numpy's default
   ``np.percentile`` method, ``torch.quantile(..., interpolation="linear")``), ``upper = Q3 + 1.5 *
   (Q3 - Q1)``, ``ratio = #(scores > upper) / (F*T)`` (strictly greater). Every frame keeps
   ``n_keep = int(T * ratio)`` tokens: ``torch.topk(scores[f], n_keep, largest=True, sorted=True)``,
   i.e. in descending score order. All frames keep the same count.
2. PruMerge+ (``plus=True``): spatially uniform samples are added. ``step = int(1 / ratio)``,
   candidates ``range(int(step / 6), T - 1, max(1, int(step / 3)))``; each frame appends, after its
   outliers and in increasing index order, the candidates that are not already among its own kept
   indices. Frames may then keep different counts.
3. Merge, per frame: ``kept`` = the kept indices in that order, ``pruned`` = the others in ascending
   index order. Keys are L2-normalised (``F.normalize(p=2, dim=-1)``). For each kept token ``i``, the
   "rest" is every other kept token (kept order, ``i`` removed) followed by every pruned token; the
   ``k = min(cluster_size, T - 1)`` rest tokens whose normalised keys have the largest dot product with
   ``i``'s form its cluster, and ``updated_i = x_i + sum_{j in cluster} scores[j] * x_j``. Quirks of the
   reference, reproduced: the weights are the raw scores (not normalised, no division), the token itself
   keeps weight 1, and other *kept* tokens may be in the cluster (they are then counted in both places).
4. Extra token: one more token per frame, ``sum_{j in pruned} scores[j] * x_j``, appended after the
   frame's kept tokens.
5. Output order: frame by frame; inside a frame the updated kept tokens in kept order, then the extra
   token.

Deviations from the reference (documented policies):

- Empty selection: if ``int(T * ratio) == 0`` each frame keeps 1 token (its top-scored one), so no frame
  vanishes; the reference would select nothing. ``PruMergeResult.ratio`` is the ratio before this clamp.
- PruMerge+ candidates: the reference hard-codes the end 575 (= N - 1 for 576 CLIP patches); here it is
  ``T - 1``. The stride ``max(1, int(step / 3))`` guards ``step < 3`` (a zero stride in the reference).
  With ``ratio == 0`` (no outlier at all) ``step = T`` instead of a division by zero. The reference tests
  "already kept" against the indices of its whole batch; here against the frame's own indices.
- Cluster size: ``k = min(cluster_size, T - 1)`` (the reference's ``topk(k=32)`` fails when fewer than 32
  rest tokens exist); with ``T == 1`` the cluster is empty and the token is unchanged.
- Extra token when nothing is pruned (every token of the frame kept, possible with PruMerge+ or a tiny
  T): it is omitted rather than emitted as a zero vector.
- Arithmetic: similarities, weights and sums are computed in float32 and the tokens cast back to the
  features' dtype (the reference works in the model's dtype, fp16). The IQR fences are computed in
  float64 on the float32-rounded scores (the reference's numpy computation is float32); the two can only
  disagree on a score within rounding of the fence.
- Vectorisation: one ``(F, K, T)`` similarity for the kept tokens of all frames against all tokens of
  their frame, with each token's own entry set to ``-inf``, replaces the reference's per-token loop and
  concatenation. A weighted sum depends on the chosen set only, which is identical unless two candidates
  tie exactly at the k-th place.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor

from dycoke.errors import ConfigError

__all__ = ["PruMergeResult", "iqr_outlier_ratio", "prumerge"]


@dataclass
class PruMergeResult:
    """Merged tokens and where each came from.

    Attributes:
        tokens: ``(N, D)`` in the output order (frame by frame: updated kept tokens, then the extra
            token), the features' dtype and device.
        tokens_per_frame: length F, kept tokens plus the extra token (if any) per frame; sums to N.
        frame_index: ``(N,)`` int64, the source frame of each output token.
        patch_index: ``(N,)`` int64, the token index 0..T-1 inside its frame of a kept token, -1 for an
            extra token.
        ratio: the adaptive IQR outlier ratio (before the ``n_keep >= 1`` clamp).
    """

    tokens: Tensor
    tokens_per_frame: list[int]
    frame_index: Tensor
    patch_index: Tensor
    ratio: float


# --------------------------------------------------------------------------------------------------
# Validation


def _check_float_tensor(name: str, value: object, dims: int, shape_text: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape {shape_text}, got {type(value).__name__}")
    if value.dim() != dims:
        raise ConfigError(f"{name} must have shape {shape_text}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ConfigError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def _check_inputs(features: object, scores: object, keys: object) -> tuple[Tensor, Tensor, Tensor]:
    """Check ``features (F, T, D)``, ``scores (F, T)``, ``keys (F, T, C)`` with the same F and T >= 1."""
    x = _check_float_tensor("features", features, 3, "(F, T, D)")
    s = _check_float_tensor("scores", scores, 2, "(F, T)")
    k = _check_float_tensor("keys", keys, 3, "(F, T, C)")
    f, t, _ = x.shape
    if f < 1 or t < 1:
        raise ConfigError(f"features must have F >= 1 frames of T >= 1 tokens, got shape {tuple(x.shape)}")
    if tuple(s.shape) != (f, t):
        raise ConfigError(f"scores must have shape (F, T) = ({f}, {t}) to match features, got {tuple(s.shape)}")
    if tuple(k.shape[:2]) != (f, t):
        raise ConfigError(f"keys must have shape (F, T, C) with (F, T) = ({f}, {t}), got {tuple(k.shape)}")
    return x, s, k


def _check_cluster_size(cluster_size: int) -> int:
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, numbers.Integral) or cluster_size < 1:
        raise ConfigError(f"cluster_size must be an integer >= 1, got {cluster_size!r}")
    return int(cluster_size)


# --------------------------------------------------------------------------------------------------
# Selection


def iqr_outlier_ratio(scores: Tensor) -> float:
    """The fraction of values of ``scores`` (any shape, all values together) above ``Q3 + 1.5 * IQR``.

    Quartiles use linear interpolation (numpy's default); the comparison is strict. Computed in float64 on
    the float32-rounded values. Example: ``[1, 2, 3, 4, 5, 6, 100, 200]`` has Q1 = 2.75, Q3 = 29.5,
    upper = 69.625, hence ratio 2/8 = 0.25.

    Raises:
        ConfigError: on a non-tensor, a non-float or an empty tensor.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point() or scores.numel() == 0:
        what = f"dtype {scores.dtype}, shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else "a non-tensor"
        raise ConfigError(f"scores must be a non-empty floating-point tensor, got {what}")
    flat = scores.detach().reshape(-1).to(torch.float32).to(torch.float64)
    quartiles = torch.quantile(flat, torch.tensor([0.25, 0.75], dtype=torch.float64, device=flat.device))
    q1, q3 = quartiles[0], quartiles[1]
    upper = q3 + 1.5 * (q3 - q1)
    return int((flat > upper).sum().item()) / flat.numel()


def _keep_count(tokens_per_frame: int, ratio: float) -> int:
    """Outlier tokens kept per frame: ``int(T * ratio)``, clamped to ``[1, T]`` (deviation: never 0)."""
    return min(tokens_per_frame, max(1, int(tokens_per_frame * ratio)))


def _plus_candidates(tokens_per_frame: int, ratio: float) -> list[int]:
    """PruMerge+'s uniform samples: ``range(int(step / 6), T - 1, max(1, int(step / 3)))``.

    ``step = int(1 / ratio)``, or T when ``ratio == 0``. T = 20, ratio = 0.1 -> step 10 -> ``[1, 4, ..., 16]``.
    """
    step = int(1 / ratio) if ratio > 0 else tokens_per_frame
    return list(range(int(step / 6), tokens_per_frame - 1, max(1, int(step / 3))))


def _select(scores: Tensor, ratio: float, plus: bool) -> tuple[Tensor, list[int]]:
    """Kept indices of every frame, padded: ``(F, K)`` long and the valid count of each row.

    Row f starts with its ``n_keep`` outliers in descending score order, then (PruMerge+) its new uniform
    samples in increasing order; the padding after ``counts[f]`` repeats indices already kept.
    """
    f, t = scores.shape
    n_keep = _keep_count(t, ratio)
    top = torch.topk(scores, n_keep, dim=1, largest=True, sorted=True).indices  # (F, n_keep)
    candidates = _plus_candidates(t, ratio) if plus else []
    if not candidates:
        return top, [n_keep] * f
    cand = torch.tensor(candidates, dtype=torch.long, device=scores.device)  # (M,)
    dup = (top.unsqueeze(2) == cand).any(dim=1)  # (F, M): candidate already an outlier of that frame
    # A stable sort moves each row's new candidates to the front, still in increasing order.
    order = torch.sort(dup.to(torch.int8), dim=1, stable=True).indices
    kept = torch.cat([top, cand[order]], dim=1)  # (F, n_keep + M)
    counts = (n_keep + (~dup).sum(dim=1)).tolist()
    return kept, [int(c) for c in counts]


# --------------------------------------------------------------------------------------------------
# Merge


def _merge(x: Tensor, s: Tensor, keys: Tensor, kept: Tensor, cluster_size: int) -> tuple[Tensor, Tensor]:
    """Updated kept tokens ``(F, K, D)`` and the extra token of every frame ``(F, D)``, in float32.

    Args:
        x: ``(F, T, D)`` float32 features.
        s: ``(F, T)`` float32 scores.
        keys: ``(F, T, C)`` keys (any float dtype).
        kept: ``(F, K)`` kept indices (padded rows are computed and discarded by the caller).
        cluster_size: the cluster size before the ``T - 1`` cap.
    """
    t = x.shape[1]
    x_kept = x.gather(1, kept.unsqueeze(2).expand(-1, -1, x.shape[2]))  # (F, K, D)
    k = min(cluster_size, t - 1)
    if k > 0:
        kn = nnf.normalize(keys.to(torch.float32), p=2, dim=-1)  # (F, T, C)
        kn_kept = kn.gather(1, kept.unsqueeze(2).expand(-1, -1, kn.shape[2]))  # (F, K, C)
        sim = torch.bmm(kn_kept, kn.transpose(1, 2))  # (F, K, T)
        sim.scatter_(2, kept.unsqueeze(2), float("-inf"))  # a token is never its own cluster member
        cluster = torch.topk(sim, k, dim=2, largest=True).indices  # (F, K, k)
        weights = torch.zeros_like(sim).scatter_(2, cluster, s.unsqueeze(1).expand_as(sim).gather(2, cluster))
        updated = x_kept + torch.bmm(weights, x)  # raw scores as weights, as the reference
    else:
        updated = x_kept
    pruned_weight = s.scatter(1, kept, 0.0)  # (F, T): scores of the pruned tokens, 0 for kept ones
    extra = torch.bmm(pruned_weight.unsqueeze(1), x).squeeze(1)  # (F, D)
    return updated, extra


def prumerge(
    features: Tensor,
    scores: Tensor,
    keys: Tensor,
    *,
    plus: bool = False,
    cluster_size: int = 32,
) -> PruMergeResult:
    """PruMerge (or PruMerge+ with ``plus=True``) of F frames; see the module docstring for the algorithm.

    Args:
        features: ``(F, T, D)`` floating-point tokens to keep and merge.
        scores: ``(F, T)`` class-attention surrogate (>= 0).
        keys: ``(F, T, C)`` keys for the cosine similarity.
        plus: add PruMerge+'s spatially uniform samples.
        cluster_size: tokens merged into each kept token (capped at T - 1); the reference uses 32.

    Returns:
        A :class:`PruMergeResult`; ``tokens`` is ``(N, D)`` in the features' dtype and device.

    Raises:
        ConfigError: on a non-tensor, a wrong rank, mismatched F or T, a non-float dtype, F or T of 0, or a
            cluster_size that is not an integer >= 1.
    """
    x_in, s_in, k_in = _check_inputs(features, scores, keys)
    size = _check_cluster_size(cluster_size)
    f, t, dim = x_in.shape
    device = x_in.device
    s = s_in.to(device=device, dtype=torch.float32)
    ratio = iqr_outlier_ratio(s)
    kept, counts = _select(s, ratio, plus)
    width = kept.shape[1]
    updated, extra = _merge(x_in.to(torch.float32), s, k_in.to(device), kept, size)

    # Rows of cat([updated.flatten(0, 1), extra]) in output order, and their positions.
    rows: list[int] = []
    frame_ids: list[int] = []
    per_frame: list[int] = []
    for frame, count in enumerate(counts):
        extra_here = count < t  # something was pruned
        rows.extend(range(frame * width, frame * width + count))
        if extra_here:
            rows.append(f * width + frame)
        n_out = count + int(extra_here)
        frame_ids.extend([frame] * n_out)
        per_frame.append(n_out)
    index = torch.tensor(rows, dtype=torch.long, device=device)
    tokens = torch.cat([updated.reshape(f * width, dim), extra]).index_select(0, index).to(x_in.dtype)
    patches = torch.cat([kept.reshape(-1), torch.full((f,), -1, dtype=torch.long, device=device)])
    patch_index = patches.index_select(0, index)
    frame_index = torch.tensor(frame_ids, dtype=torch.long, device=device)
    return PruMergeResult(tokens, per_frame, frame_index, patch_index, ratio)
