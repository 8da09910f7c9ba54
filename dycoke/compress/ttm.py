"""Stage I of DyCoke: token temporal merging (TTM), run once per video before prefill.

Input: the projected and pooled features of F video frames, flattened to ``(F*T, D)`` (T tokens per
frame, 196 for LLaVA-OneVision; the trailing newline embedding is *not* part of the input). Output: the
``(N, D)`` tokens that survive, in exactly the order of the authors' reference code (KD-TAO/DyCoke,
``dycole_ttm``, as of its "Update ttm code" commit). ``keep = int((1 - K) * T)``.

1. Pairs. For ``i = 0, 2, 4, ...`` with ``i + 1 < F``: frame ``i`` is kept whole; frame ``i + 1`` keeps
   the ``keep`` positions with the lowest per-position cosine similarity to frame ``i``. As in the
   reference, both frames are L2-normalised (``F.normalize``) before ``F.cosine_similarity``.
2. Windows of four. For ``i = 0, 4, 8, ...`` while ``i < F - 4``: frame ``i + 2`` is re-pruned against
   frame ``i`` (plain ``F.cosine_similarity`` on the original, unpruned frames), replacing step 1's
   choice for that frame.
3. Frames are concatenated in frame order. Inside a pruned frame the kept tokens are in the order of
   ``torch.topk(sim, keep, largest=False)`` (ascending similarity), not raster order.

Policies (the reference code's quirks are reproduced by default; options and deviations are marked):

- Last window: by default step 2 uses the reference bound ``i < F - 4``, so with an even F divisible
  by 4 the last window is not re-pruned (F=32: frames 0, 4, ..., 28 *and 30* stay whole; K=0.7 gives
  3098 tokens). ``prune_last_window=True`` re-prunes frame ``i + 2`` of every window whose frame
  ``i + 2`` is part of a pair, i.e. ``i = 0, 4, ...`` while ``i + 4 <= 2 * (F // 2)``
  (``F // 4`` windows; F=32, K=0.7 gives 2960 tokens). For F not a multiple of 4 both bounds agree.
- Odd F: by default the last frame (the one without a partner) is dropped entirely, as upstream.
  ``keep_odd_last_frame=True`` keeps it whole instead (it is never pruned). The window bound still uses
  F (not the even part of F), as upstream: F=33, K=0.7 gives 2960 tokens (3156 with the option).
- Small F (deviation: the reference crashes for F <= 4 because step 2 has no window): for
  ``2 <= F <= 4`` step 1 runs and step 2 runs only where its bound allows (never by default;
  ``prune_last_window=True`` re-prunes frame 2 of a 4-frame video). F = 1 has no pair: the lone frame
  is kept whole whatever the options (the odd-frame drop never empties a video).
- K = 0 (deviation): no merging at all, the features are returned unchanged in raster order (the very
  input tensor, not a copy). The reference would keep all T tokens of each "pruned" frame but reorder
  them by similarity, which only shuffles positions; returning the input makes K = 0 identical to the
  uncompressed path. K must lie in ``[0, 1)``.
- Similarity dtype (accepted deviation): the reference computed similarities in the features' dtype
  (fp16). By default they are computed in fp32 (``similarity_dtype=torch.float32``);
  ``similarity_dtype=None`` computes them in the features' own dtype. The selected tokens themselves are
  always copied from the input, in its dtype.

The token count depends on (F, T, K) and the options only, never on the features, so
:func:`ttm_token_count` sizes the ``<video>`` placeholder run before generation. For F >= 5 in the
default mode, with ``Q = F // 2`` and ``W = len(range(0, F - 4, 4))``: ``N = (Q - W)*T + (Q + W)*keep``.

Every entry point also accepts a batch ``(B, F*T, D)``; all samples share F, T and K, hence N.
The implementation is vectorised: one batched similarity per step, one ``topk`` over all pruned frames,
one gather. This module imports torch only.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor

from dycoke.errors import ConfigError
from dycoke.transfer import to_device

__all__ = [
    "MergeResult",
    "TtmSchedule",
    "kept_mask",
    "temporal_token_merge",
    "temporal_token_merge_with_positions",
    "ttm_frame_counts",
    "ttm_keep",
    "ttm_schedule",
    "ttm_token_count",
]


# --------------------------------------------------------------------------------------------------
# Validation


def _check_tokens_per_frame(tokens_per_frame: int) -> int:
    if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, numbers.Integral):
        raise ConfigError(f"tokens_per_frame must be a positive integer, got {tokens_per_frame!r}")
    if tokens_per_frame <= 0:
        raise ConfigError(f"tokens_per_frame must be a positive integer, got {tokens_per_frame!r}")
    return int(tokens_per_frame)


def _check_num_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral) or num_frames < 1:
        raise ConfigError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    return int(num_frames)


def _check_merge_ratio(merge_ratio: float) -> float:
    if isinstance(merge_ratio, bool) or not isinstance(merge_ratio, numbers.Real):
        raise ConfigError(f"merge_ratio must be a number in [0, 1), got {merge_ratio!r}")
    value = float(merge_ratio)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"merge_ratio must be in [0, 1), got {merge_ratio!r}")
    return value


def _check_features(features: Tensor, tokens_per_frame: int) -> tuple[Tensor, int]:
    """Return the features as ``(B, F*T, D)`` (a view) and F."""
    if not isinstance(features, Tensor):
        raise ConfigError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() not in (2, 3):
        raise ConfigError(f"features must have shape (F*T, D) or (B, F*T, D), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ConfigError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    rows = features.shape[-2]
    if rows == 0 or rows % tokens_per_frame != 0:
        raise ConfigError(
            f"features have {rows} tokens, not a positive multiple of tokens_per_frame={tokens_per_frame}"
        )
    batched = features if features.dim() == 3 else features.unsqueeze(0)
    return batched, rows // tokens_per_frame


def _check_similarity_dtype(similarity_dtype: torch.dtype | None) -> None:
    if similarity_dtype is not None and (
        not isinstance(similarity_dtype, torch.dtype) or not similarity_dtype.is_floating_point
    ):
        raise ConfigError(f"similarity_dtype must be a floating-point torch.dtype or None, got {similarity_dtype!r}")


# --------------------------------------------------------------------------------------------------
# Schedule: which frame is whole, pruned or dropped. Depends on (F, T, K, options) only.


def ttm_keep(tokens_per_frame: int, merge_ratio: float) -> int:
    """Tokens kept in a pruned frame: ``int((1 - K) * T)``, float product then truncation (as upstream).

    K=0.7, T=196 -> 58 (the product is 58.80...); K=0.5 -> 98; K=0.3 -> 137.
    """
    t = _check_tokens_per_frame(tokens_per_frame)
    k = _check_merge_ratio(merge_ratio)
    return int((1 - k) * t)


@dataclass(frozen=True)
class TtmSchedule:
    """What TTM does to each frame of an F-frame video; independent of the features.

    Attributes:
        num_frames: F, the number of input frames.
        tokens_per_frame: T.
        keep: tokens kept in a pruned frame, ``int((1 - K) * T)`` (T when ``identity``).
        identity: K == 0: nothing is pruned nor reordered, every frame is kept whole.
        num_pairs: Q, the pairs ``(2q, 2q + 1)``; frame ``2q + 1`` is pruned against frame ``2q``.
        num_windows: W, the windows whose frame ``4w + 2`` is re-pruned against frame ``4w``.
        last_frame_whole: F is odd and its last frame is kept whole (otherwise an odd last frame is
            dropped).
    """

    num_frames: int
    tokens_per_frame: int
    keep: int
    identity: bool
    num_pairs: int
    num_windows: int
    last_frame_whole: bool

    @property
    def num_output_frames(self) -> int:
        """Frames that contribute tokens (a dropped odd last frame does not)."""
        if self.identity:
            return self.num_frames
        return 2 * self.num_pairs + int(self.last_frame_whole)

    def frame_counts(self) -> list[int]:
        """Tokens kept per input frame, length F (0 for a dropped frame)."""
        t, f = self.tokens_per_frame, self.num_frames
        if self.identity:
            return [t] * f
        counts = [0] * f
        for q in range(self.num_pairs):
            counts[2 * q] = t
            counts[2 * q + 1] = self.keep
        for w in range(self.num_windows):
            counts[4 * w + 2] = self.keep
        if self.last_frame_whole:
            counts[f - 1] = t
        return counts

    @property
    def num_tokens(self) -> int:
        """N, the number of merged tokens."""
        t = self.tokens_per_frame
        if self.identity:
            return self.num_frames * t
        q, w = self.num_pairs, self.num_windows
        return (q - w) * t + (q + w) * self.keep + t * int(self.last_frame_whole)


def ttm_schedule(
    num_frames: int,
    tokens_per_frame: int,
    merge_ratio: float,
    *,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> TtmSchedule:
    """The per-frame plan of TTM for F frames (see the module docstring for the policies)."""
    f = _check_num_frames(num_frames)
    t = _check_tokens_per_frame(tokens_per_frame)
    k = _check_merge_ratio(merge_ratio)
    if k == 0.0:
        return TtmSchedule(f, t, t, True, 0, 0, False)
    pairs = f // 2
    # Default: the reference bound i < F - 4 (on F, not the even part of F). Option: every window
    # i = 0, 4, ... with i + 4 <= 2 * pairs.
    windows = pairs // 2 if prune_last_window else len(range(0, f - 4, 4))
    last_whole = f % 2 == 1 and (keep_odd_last_frame or pairs == 0)
    return TtmSchedule(f, t, int((1 - k) * t), False, pairs, windows, last_whole)


def ttm_frame_counts(
    num_frames: int,
    tokens_per_frame: int,
    merge_ratio: float,
    *,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> list[int]:
    """Tokens kept per input frame (length F). F=32, T=196, K=0.7: [196,58,58,58]*7 + [196,58,196,58]."""
    return ttm_schedule(
        num_frames,
        tokens_per_frame,
        merge_ratio,
        prune_last_window=prune_last_window,
        keep_odd_last_frame=keep_odd_last_frame,
    ).frame_counts()


def ttm_token_count(
    num_frames: int,
    tokens_per_frame: int,
    merge_ratio: float,
    *,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> int:
    """N, the length of :func:`temporal_token_merge`'s output for F frames (newline token excluded).

    F=32, T=196: K=0.3 -> 4915, K=0.5 -> 4018, K=0.7 -> 3098 (of 6272).
    """
    return ttm_schedule(
        num_frames,
        tokens_per_frame,
        merge_ratio,
        prune_last_window=prune_last_window,
        keep_odd_last_frame=keep_odd_last_frame,
    ).num_tokens


# --------------------------------------------------------------------------------------------------
# The merge


@dataclass(frozen=True)
class MergeResult:
    """Merged tokens and where each came from.

    Attributes:
        tokens: ``(N, D)``, or ``(B, N, D)`` for a batched input; dtype and device of the input.
        frame_index: ``(N,)`` / ``(B, N)`` int64, the input frame of each output token.
        patch_index: ``(N,)`` / ``(B, N)`` int64, its position (0..T-1) inside that frame.
        tokens_per_frame_kept: length F, tokens kept per input frame (same for every sample).
        num_frames: F.
        tokens_per_frame: T.
    """

    tokens: Tensor
    frame_index: Tensor
    patch_index: Tensor
    tokens_per_frame_kept: list[int]
    num_frames: int
    tokens_per_frame: int

    def kept_mask(self) -> Tensor:
        """Bool ``(F, T)`` (``(B, F, T)`` if batched): True where a patch survives."""
        flat = self.frame_index * self.tokens_per_frame + self.patch_index
        lead = flat.shape[:-1]
        mask = torch.zeros((*lead, self.num_frames * self.tokens_per_frame), dtype=torch.bool, device=flat.device)
        mask.scatter_(-1, flat, True)
        return mask.view(*lead, self.num_frames, self.tokens_per_frame)


def _cosine(a: Tensor, b: Tensor, dtype: torch.dtype, normalize_first: bool) -> Tensor:
    """Per-position cosine similarity over the last dim: ``(..., T, D) x2 -> (..., T)``."""
    a = a.to(dtype)
    b = b.to(dtype)
    if normalize_first:  # the reference normalises the pair frames before cosine_similarity
        a = nnf.normalize(a, p=2, dim=-1)
        b = nnf.normalize(b, p=2, dim=-1)
    return nnf.cosine_similarity(a, b, dim=-1)


def temporal_token_merge_with_positions(
    features: Tensor,
    merge_ratio: float,
    tokens_per_frame: int = 196,
    *,
    similarity_dtype: torch.dtype | None = torch.float32,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> MergeResult:
    """TTM with provenance: the merged tokens and, for each, its (frame, patch) index.

    Args:
        features: ``(F*T, D)`` or ``(B, F*T, D)`` floating-point frame features, frame-major.
        merge_ratio: K in ``[0, 1)``; each pruned frame keeps ``int((1 - K) * T)`` tokens.
        tokens_per_frame: T.
        similarity_dtype: dtype of the similarity computation; None = the features' dtype.
        prune_last_window: also re-prune frame ``i + 2`` of the last complete window.
        keep_odd_last_frame: keep the last frame of an odd F whole instead of dropping it.

    Returns:
        A :class:`MergeResult`; ``tokens`` is ``(N, D)`` (or ``(B, N, D)``) with
        ``N == ttm_token_count(F, T, K, ...)``.

    Raises:
        ConfigError: on a non-tensor, a shape that is not ``(F*T, D)``, a non-float dtype, T <= 0 or K
            outside ``[0, 1)``.
    """
    t = _check_tokens_per_frame(tokens_per_frame)
    x, f = _check_features(features, t)
    _check_similarity_dtype(similarity_dtype)
    sched = ttm_schedule(
        f, t, merge_ratio, prune_last_window=prune_last_window, keep_odd_last_frame=keep_odd_last_frame
    )
    counts = sched.frame_counts()
    batch, _, dim = x.shape
    device = x.device
    squeeze = features.dim() == 2

    def finish(tokens: Tensor, frame_index: Tensor, patch_index: Tensor) -> MergeResult:
        if squeeze:
            tokens, frame_index, patch_index = tokens[0], frame_index[0], patch_index[0]
        return MergeResult(tokens, frame_index, patch_index, counts, f, t)

    if sched.identity:  # K == 0: the input itself, positions in raster order
        pos = torch.arange(f * t, device=device)
        if not squeeze:
            pos = pos.repeat(batch, 1)
        return MergeResult(features, pos // t, pos % t, counts, f, t)

    frames = x.view(batch, f, t, dim)
    q, w, keep = sched.num_pairs, sched.num_windows, sched.keep
    sim_dtype = x.dtype if similarity_dtype is None else similarity_dtype

    # Similarities: pairs (2q, 2q+1) with normalisation, windows (4w, 4w+2) without: (B, Q + W, T).
    sims = []
    if q:
        sims.append(_cosine(frames[:, 0 : 2 * q : 2], frames[:, 1 : 2 * q : 2], sim_dtype, True))
    if w:
        sims.append(_cosine(frames[:, 0 : 4 * w : 4], frames[:, 2 : 4 * w : 4], sim_dtype, False))

    # Patch index of every slot of every output frame: (B, F_out, T); a pruned frame fills its first
    # `keep` slots with the topk order and leaves the rest unused.
    f_out = sched.num_output_frames
    slots = torch.arange(t, device=device).repeat(batch, f_out, 1)
    used = torch.ones(f_out, t, dtype=torch.bool)
    if sims:
        chosen = torch.topk(torch.cat(sims, dim=1), keep, dim=-1, largest=False).indices  # (B, Q+W, keep)
        slots[:, 1 : 2 * q : 2, :keep] = chosen[:, :q]
        used[1 : 2 * q : 2, keep:] = False
        if w:
            slots[:, 2 : 4 * w : 4, :keep] = chosen[:, q:]
            used[2 : 4 * w : 4, keep:] = False

    # Which slots are used is the same for every sample: select them with a host-computed index.
    sel = to_device(used.flatten().nonzero().squeeze(1), device)  # (N,) in frame-major slot order
    patch_index = slots.flatten(1).index_select(1, sel)  # (B, N)
    frame_index = (sel // t).repeat(batch, 1)  # output frame j is input frame j
    flat = frame_index * t + patch_index
    tokens = x[torch.arange(batch, device=device).unsqueeze(1), flat]  # (B, N, D)
    return finish(tokens, frame_index, patch_index)


def temporal_token_merge(
    features: Tensor,
    merge_ratio: float,
    tokens_per_frame: int = 196,
    *,
    similarity_dtype: torch.dtype | None = torch.float32,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> Tensor:
    """DyCoke TTM: ``(F*T, D) -> (N, D)`` (or ``(B, F*T, D) -> (B, N, D)``), in the reference order.

    See :func:`temporal_token_merge_with_positions` for the arguments and the module docstring for the
    policies. ``N == ttm_token_count(F, T, K, ...)``.
    """
    return temporal_token_merge_with_positions(
        features,
        merge_ratio,
        tokens_per_frame,
        similarity_dtype=similarity_dtype,
        prune_last_window=prune_last_window,
        keep_odd_last_frame=keep_odd_last_frame,
    ).tokens


def kept_mask(
    features: Tensor,
    merge_ratio: float,
    tokens_per_frame: int = 196,
    *,
    similarity_dtype: torch.dtype | None = torch.float32,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> Tensor:
    """Bool ``(F, T)`` (``(B, F, T)`` for a batch): True for each patch that TTM keeps."""
    return temporal_token_merge_with_positions(
        features,
        merge_ratio,
        tokens_per_frame,
        similarity_dtype=similarity_dtype,
        prune_last_window=prune_last_window,
        keep_odd_last_frame=keep_odd_last_frame,
    ).kept_mask()
