"""Stage I (token temporal merging): counts, kept positions, order, and a naive reference, all on CPU."""

from __future__ import annotations

import itertools
from typing import TypedDict

import pytest
import torch
import torch.nn.functional as nnf

from dycoke.compress.ttm import (
    kept_mask,
    temporal_token_merge,
    temporal_token_merge_with_positions,
    ttm_frame_counts,
    ttm_keep,
    ttm_token_count,
)
from dycoke.errors import ConfigError

T196 = 196


class Options(TypedDict):
    prune_last_window: bool
    keep_odd_last_frame: bool


OPTIONS = [Options(prune_last_window=p, keep_odd_last_frame=o) for p, o in itertools.product((False, True), repeat=2)]


def naive_ttm(
    x: torch.Tensor,
    merge_ratio: float,
    t: int,
    *,
    similarity_dtype: torch.dtype | None = torch.float32,
    prune_last_window: bool = False,
    keep_odd_last_frame: bool = False,
) -> torch.Tensor:
    """A loop-per-frame transliteration of DYCOKE.md's Stage I prose (K > 0 only)."""
    n_frames = x.shape[0] // t
    frames = [x[i * t : (i + 1) * t] for i in range(n_frames)]
    keep = int((1 - merge_ratio) * t)
    dtype = x.dtype if similarity_dtype is None else similarity_dtype
    out: dict[int, torch.Tensor] = {}
    # 1. pairs: frame i whole, frame i+1 keeps its `keep` least similar positions (frames normalised
    # first, as the reference code does).
    for i in range(0, n_frames - 1, 2):
        a = nnf.normalize(frames[i].to(dtype), p=2, dim=1)
        b = nnf.normalize(frames[i + 1].to(dtype), p=2, dim=1)
        sim = nnf.cosine_similarity(a, b, dim=1)
        out[i] = frames[i]
        out[i + 1] = frames[i + 1][sim.topk(keep, largest=False).indices]
    # 2. windows of four: frame i+2 re-pruned against frame i, on the original frames.
    bound = 2 * (n_frames // 2) - 3 if prune_last_window else n_frames - 4
    for i in range(0, bound, 4):
        sim = nnf.cosine_similarity(frames[i].to(dtype), frames[i + 2].to(dtype), dim=1)
        out[i + 2] = frames[i + 2][sim.topk(keep, largest=False).indices]
    # odd F: the last frame is dropped, unless kept whole by option (or it is the only frame).
    if n_frames % 2 == 1 and (keep_odd_last_frame or n_frames == 1):
        out[n_frames - 1] = frames[n_frames - 1]
    # 3. frame order.
    return torch.cat([out[i] for i in sorted(out)])


def closed_form(n_frames: int, t: int, merge_ratio: float) -> int:
    q = n_frames // 2
    w = len(range(0, n_frames - 4, 4))
    keep = int((1 - merge_ratio) * t)
    return (q - w) * t + (q + w) * keep


def with_cosine(ref: torch.Tensor, c: float, gen: torch.Generator) -> torch.Tensor:
    """A vector whose cosine similarity with ``ref`` (1-D) is ``c``."""
    u = ref / ref.norm()
    r = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    perp = r - (r @ u) * u
    perp = perp / perp.norm()
    return c * u + (1 - c * c) ** 0.5 * perp


# ---------------------------------------------------------------------------------------------------
# Counts


def test_keep_values() -> None:
    assert ttm_keep(T196, 0.7) == 58  # (1 - 0.7) * 196 = 58.800000000000004
    assert ttm_keep(T196, 0.5) == 98
    assert ttm_keep(T196, 0.3) == 137
    assert ttm_keep(T196, 0.0) == T196


@pytest.mark.parametrize(
    ("n_frames", "merge_ratio", "expected"),
    [(32, 0.3, 4915), (32, 0.5, 4018), (32, 0.7, 3098), (16, 0.7, 1618), (64, 0.7, 6058)],
)
def test_paper_token_counts(n_frames: int, merge_ratio: float, expected: int) -> None:
    assert ttm_token_count(n_frames, T196, merge_ratio) == expected
    x = torch.randn(n_frames * T196, 4)
    assert temporal_token_merge(x, merge_ratio).shape == (expected, 4)


@pytest.mark.parametrize("n_frames", [8, 16, 32, 64])
@pytest.mark.parametrize("merge_ratio", [0.3, 0.5, 0.7])
def test_closed_form(n_frames: int, merge_ratio: float) -> None:
    assert ttm_token_count(n_frames, T196, merge_ratio) == closed_form(n_frames, T196, merge_ratio)


def test_closed_form_every_f_from_5() -> None:
    for n_frames, k in itertools.product(range(5, 130), (0.1, 0.3, 0.5, 0.7, 0.9)):
        assert ttm_token_count(n_frames, T196, k) == closed_form(n_frames, T196, k)


def test_count_matches_output_length() -> None:
    t, d = 6, 3
    for n_frames, k, opts in itertools.product(range(1, 41), (0.0, 0.2, 0.5, 0.7, 0.95), OPTIONS):
        x = torch.randn(n_frames * t, d)
        result = temporal_token_merge_with_positions(x, k, t, **opts)
        n = ttm_token_count(n_frames, t, k, **opts)
        assert result.tokens.shape == (n, d), (n_frames, k, opts)
        assert sum(result.tokens_per_frame_kept) == n
        assert result.tokens_per_frame_kept == ttm_frame_counts(n_frames, t, k, **opts)
        assert torch.bincount(result.frame_index, minlength=n_frames).tolist() == result.tokens_per_frame_kept


def test_frame_pattern_f32_k07() -> None:
    expected = [196, 58, 58, 58] * 7 + [196, 58, 196, 58]
    assert ttm_frame_counts(32, T196, 0.7) == expected
    x = torch.randn(32 * T196, 8)
    assert kept_mask(x, 0.7).sum(dim=1).tolist() == expected
    result = temporal_token_merge_with_positions(x, 0.7)
    assert result.tokens_per_frame_kept == expected
    assert torch.bincount(result.frame_index, minlength=32).tolist() == expected
    # frame indices are non-decreasing: tokens come in frame order
    assert bool((result.frame_index.diff() >= 0).all())


def test_option_counts_f32_f33() -> None:
    assert ttm_token_count(32, T196, 0.7) == 3098
    assert ttm_token_count(32, T196, 0.7, keep_odd_last_frame=True) == 3098
    assert ttm_token_count(32, T196, 0.7, prune_last_window=True) == 2960
    assert ttm_frame_counts(32, T196, 0.7, prune_last_window=True) == [196, 58, 58, 58] * 8
    assert ttm_token_count(33, T196, 0.7) == 2960  # the bound uses F=33: window 28 is re-pruned
    assert ttm_token_count(33, T196, 0.7, keep_odd_last_frame=True) == 2960 + 196
    assert ttm_frame_counts(33, T196, 0.7)[-1] == 0


# ---------------------------------------------------------------------------------------------------
# Kept positions and order


def test_kept_positions_follow_the_right_reference_frame() -> None:
    """Frames 1 and 2 are pruned against frame 0, frame 3 against the original frame 2."""
    gen = torch.Generator().manual_seed(0)
    n_frames, t, d, changed = 8, 16, 8, 4
    merge_ratio = 0.75  # keep = int(0.25 * 16) = 4 = number of changed patches per pruned frame
    assert ttm_keep(t, merge_ratio) == changed
    base = torch.randn(t, d, generator=gen, dtype=torch.float64)
    frames = [base.clone() for _ in range(n_frames)]
    expected: dict[int, set[int]] = {}
    for w0 in (0, 4):
        perm = torch.randperm(t, generator=gen).tolist()
        s1, s2, s3 = perm[0:4], perm[4:8], perm[8:12]
        # f1: strong change vs f0. f2: milder change vs f0 (pruning it against f1 would pick s1).
        for p in s1:
            frames[w0 + 1][p] = with_cosine(base[p], -0.9, gen)
        for p in s2:
            frames[w0 + 2][p] = with_cosine(base[p], -0.5, gen)
        # f3 = f2 with s3 changed: vs the original f2 only s3 changed (vs f0, s2 would be lower).
        frames[w0 + 3] = frames[w0 + 2].clone()
        for p in s3:
            frames[w0 + 3][p] = with_cosine(frames[w0 + 2][p], 0.0, gen)
        expected.update({w0 + 1: set(s1), w0 + 2: set(s2), w0 + 3: set(s3)})
    x = torch.cat(frames).float()

    mask = kept_mask(x, merge_ratio, t)
    all_patches = set(range(t))
    for f in range(n_frames):
        kept = set(mask[f].nonzero().squeeze(1).tolist())
        if f in (0, 4, 6):  # 6: the last window is not re-pruned by default (bound F - 4)
            assert kept == all_patches, f
        else:
            assert kept == expected[f], f

    mask = kept_mask(x, merge_ratio, t, prune_last_window=True)
    assert set(mask[6].nonzero().squeeze(1).tolist()) == expected[6]

    # the tokens are the input rows their positions say
    result = temporal_token_merge_with_positions(x, merge_ratio, t)
    assert torch.equal(result.tokens, x[result.frame_index * t + result.patch_index])


def test_order_inside_pruned_frames_is_ascending_similarity() -> None:
    gen = torch.Generator().manual_seed(1)
    t, d = 10, 12
    cos_pair = torch.tensor([0.9, -0.3, 0.5, 0.1, -0.8, 0.7, 0.0, 0.3, -0.6, 0.8], dtype=torch.float64)
    cos_window = torch.tensor([-0.2, 0.6, 0.4, -0.9, 0.2, 0.95, -0.5, 0.1, 0.75, -0.7], dtype=torch.float64)
    base = torch.randn(t, d, generator=gen, dtype=torch.float64)
    f1 = torch.stack([with_cosine(base[p], float(cos_pair[p]), gen) for p in range(t)])
    f2 = torch.stack([with_cosine(base[p], float(cos_window[p]), gen) for p in range(t)])
    f3 = torch.randn(t, d, generator=gen, dtype=torch.float64)
    f4 = torch.randn(t, d, generator=gen, dtype=torch.float64)
    x = torch.cat([base, f1, f2, f3, f4]).float()  # F = 5: one window, frame 4 dropped
    merge_ratio = 0.4  # keep = 6
    keep = ttm_keep(t, merge_ratio)
    result = temporal_token_merge_with_positions(x, merge_ratio, t)
    assert result.patch_index[result.frame_index == 0].tolist() == list(range(t))
    assert result.patch_index[result.frame_index == 1].tolist() == cos_pair.argsort()[:keep].tolist()
    assert result.patch_index[result.frame_index == 2].tolist() == cos_window.argsort()[:keep].tolist()
    assert result.frame_index.tolist() == [0] * t + [1] * keep + [2] * keep + [3] * keep


def test_ties_follow_torch_topk() -> None:
    """Exactly tied similarities (one-hot features) are ordered as a per-frame ``topk`` orders them."""
    t = 12
    eye = torch.eye(t)
    f1 = eye.clone()
    f1[[2, 7]] = -eye[[2, 7]]  # similarity -1 at 2 and 7, exactly 1 elsewhere
    f2 = eye.clone()
    f2[[0, 5, 9]] = eye[[1, 6, 10]]  # similarity exactly 0 at 0, 5, 9
    frames = [eye, f1, f2, eye.clone(), eye.clone(), f1.clone(), eye.clone(), f2.clone(), eye.clone()]
    x = torch.cat(frames)
    for k in (0.3, 0.5, 0.7):
        for opts in OPTIONS:
            assert torch.equal(temporal_token_merge(x, k, t, **opts), naive_ttm(x, k, t, **opts)), (k, opts)


# ---------------------------------------------------------------------------------------------------
# Against the naive reference


@pytest.mark.parametrize("merge_ratio", [0.3, 0.5, 0.7, 0.9])
def test_matches_naive_reference(merge_ratio: float) -> None:
    gen = torch.Generator().manual_seed(2)
    for n_frames in range(5, 41):
        x = torch.randn(n_frames * T196, 16, generator=gen)
        expected = naive_ttm(x, merge_ratio, T196)
        assert torch.equal(temporal_token_merge(x, merge_ratio), expected), n_frames


@pytest.mark.parametrize("opts", OPTIONS)
def test_matches_naive_reference_with_options(opts: Options) -> None:
    gen = torch.Generator().manual_seed(3)
    for n_frames in range(1, 41):
        x = torch.randn(n_frames * 20, 6, generator=gen)
        for k in (0.3, 0.7):
            assert torch.equal(temporal_token_merge(x, k, 20, **opts), naive_ttm(x, k, 20, **opts)), n_frames


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_similarity_matches_naive(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    for n_frames in (5, 8, 17, 32):
        x = torch.randn(n_frames * T196, 32, generator=gen).to(dtype)
        got = temporal_token_merge(x, 0.7, similarity_dtype=None)
        assert got.dtype == dtype
        assert torch.equal(got, naive_ttm(x, 0.7, T196, similarity_dtype=None)), n_frames
        # fp32 similarities (the default) on the same low-precision features: same length, same dtype
        assert temporal_token_merge(x, 0.7).shape == got.shape


def test_batched_equals_per_sample() -> None:
    gen = torch.Generator().manual_seed(5)
    n_frames, batch = 13, 3
    x = torch.randn(batch, n_frames * T196, 8, generator=gen)
    for opts in OPTIONS:
        result = temporal_token_merge_with_positions(x, 0.5, **opts)
        n = ttm_token_count(n_frames, T196, 0.5, **opts)
        assert result.tokens.shape == (batch, n, 8)
        assert result.frame_index.shape == result.patch_index.shape == (batch, n)
        assert kept_mask(x, 0.5, **opts).shape == (batch, n_frames, T196)
        for b in range(batch):
            single = temporal_token_merge_with_positions(x[b], 0.5, **opts)
            assert torch.equal(result.tokens[b], single.tokens)
            assert torch.equal(result.patch_index[b], single.patch_index)
            assert torch.equal(result.frame_index[b], single.frame_index)


# ---------------------------------------------------------------------------------------------------
# Policies


def test_odd_frame_count() -> None:
    gen = torch.Generator().manual_seed(6)
    t = 196
    x = torch.randn(33 * t, 8, generator=gen)
    # default: the 33rd frame is dropped; the window bound F - 4 = 29 re-prunes window 28 (frame 30)
    dropped = temporal_token_merge(x, 0.7)
    assert torch.equal(dropped, temporal_token_merge(x[: 32 * t], 0.7, prune_last_window=True))
    assert ttm_frame_counts(33, t, 0.7)[30] == 58
    # option: the 33rd frame is kept whole, in raster order, at the end
    kept = temporal_token_merge(x, 0.7, keep_odd_last_frame=True)
    assert torch.equal(kept, torch.cat([dropped, x[32 * t :]]))


def test_prune_last_window_f32() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32 * T196, 8, generator=gen)
    default = temporal_token_merge_with_positions(x, 0.7)
    pruned = temporal_token_merge_with_positions(x, 0.7, prune_last_window=True)
    assert default.tokens.shape[0] == 3098 and pruned.tokens.shape[0] == 2960
    assert default.tokens_per_frame_kept[30] == 196 and pruned.tokens_per_frame_kept[30] == 58
    # frame 30 is pruned against frame 28; everything before it is unchanged
    sim = nnf.cosine_similarity(x[28 * T196 : 29 * T196], x[30 * T196 : 31 * T196], dim=1)
    assert pruned.patch_index[pruned.frame_index == 30].tolist() == sim.topk(58, largest=False).indices.tolist()
    head = int((default.frame_index < 30).sum())
    assert torch.equal(default.tokens[:head], pruned.tokens[:head])


def test_small_frame_counts() -> None:
    gen = torch.Generator().manual_seed(8)
    t, k = 196, 0.7
    keep = ttm_keep(t, k)
    x = torch.randn(4 * t, 8, generator=gen)
    # F = 1: the lone frame is kept whole, whatever the options
    for opts in OPTIONS:
        assert torch.equal(temporal_token_merge(x[:t], k, **opts), x[:t])
        assert ttm_token_count(1, t, k, **opts) == t
    # F = 2..4: the pairs step only (no window by default)
    two = temporal_token_merge(x[: 2 * t], k)
    assert two.shape[0] == t + keep and torch.equal(two[:t], x[:t])
    assert torch.equal(temporal_token_merge(x[: 3 * t], k), two)
    assert torch.equal(
        temporal_token_merge(x[: 3 * t], k, keep_odd_last_frame=True), torch.cat([two, x[2 * t : 3 * t]])
    )
    assert ttm_frame_counts(4, t, k) == [t, keep, t, keep]
    assert ttm_frame_counts(4, t, k, prune_last_window=True) == [t, keep, keep, keep]
    assert ttm_frame_counts(3, t, k) == [t, keep, 0]
    assert ttm_frame_counts(3, t, k, keep_odd_last_frame=True) == [t, keep, t]


def test_zero_ratio_is_identity() -> None:
    for n_frames in (1, 2, 5, 32, 33):
        x = torch.randn(n_frames * T196, 8)
        for opts in OPTIONS:
            result = temporal_token_merge_with_positions(x, 0.0, **opts)
            assert result.tokens is x
            assert ttm_token_count(n_frames, T196, 0, **opts) == n_frames * T196
            assert result.patch_index.tolist() == list(range(T196)) * n_frames
            assert bool(result.kept_mask().all())


def test_tiny_keep_and_extreme_ratio() -> None:
    x = torch.randn(8 * 4, 3)
    # keep = int(0.2 * 4) = int(0.8000000000000002) = 0: pruned frames vanish entirely; F = 8 leaves
    # frames 0, 4 and 6 (the last window is not re-pruned)
    assert ttm_keep(4, 0.8) == 0
    assert torch.equal(temporal_token_merge(x, 0.8, 4), torch.cat([x[0:4], x[16:20], x[24:28]]))
    assert ttm_token_count(8, 4, 0.8) == 12


@pytest.mark.parametrize(
    "kwargs",
    [
        {"merge_ratio": 1.0},
        {"merge_ratio": -0.1},
        {"merge_ratio": float("nan")},
        {"merge_ratio": "0.5"},
        {"merge_ratio": True},
        {"tokens_per_frame": 0},
        {"tokens_per_frame": -196},
        {"tokens_per_frame": 2.5},
        {"features": torch.randn(196)},
        {"features": torch.randn(1, 1, 196, 4)},
        {"features": torch.randn(195, 4)},
        {"features": torch.randn(0, 4)},
        {"features": torch.ones(392, 4, dtype=torch.int64)},
        {"features": [[0.0]]},
        {"similarity_dtype": torch.int32},
    ],
)
def test_invalid_inputs_raise_config_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"features": torch.randn(392, 4), "merge_ratio": 0.5, "tokens_per_frame": 196}
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        temporal_token_merge(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("n_frames", "t", "k"), [(0, 196, 0.5), (-1, 196, 0.5), (2.0, 196, 0.5), (8, 0, 0.5), (8, 196, 1.5)]
)
def test_invalid_count_arguments(n_frames: int, t: int, k: float) -> None:
    with pytest.raises(ConfigError):
        ttm_token_count(n_frames, t, k)
