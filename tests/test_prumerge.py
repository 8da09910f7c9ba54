"""PruMerge / PruMerge+ on per-frame tokens: IQR ratio, selection, uniform samples, merge weights, and an
independent per-token loop reference, all on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from dycoke.compress.prumerge import _plus_candidates, iqr_outlier_ratio, prumerge
from dycoke.errors import ConfigError


def _tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _features(f: int, t: int, d: int = 3) -> torch.Tensor:
    return torch.arange(f * t * d, dtype=torch.float32).reshape(f, t, d)


# --------------------------------------------------------------------------------------------------
# Independent slow reference: the per-token loop of the authors' code, one frame at a time.


def slow_prumerge(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, plus: bool, cluster_size: int
) -> tuple[torch.Tensor, list[int], list[int], list[int], float]:
    n_frames, t, _ = features.shape
    flat = scores.to(torch.float32).numpy().astype(np.float64).ravel()
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    upper = q3 + 1.5 * (q3 - q1)
    ratio = float(np.sum(flat > upper)) / flat.size
    n_keep = int(t * ratio)
    if n_keep == 0:
        n_keep = 1
    out: list[torch.Tensor] = []
    frame_ids: list[int] = []
    patch_ids: list[int] = []
    counts: list[int] = []
    for f in range(n_frames):
        x = features[f].to(torch.float32)
        s = scores[f].to(torch.float32)
        kn = nnf.normalize(keys[f].to(torch.float32), p=2, dim=-1)
        outliers = torch.topk(s, n_keep, largest=True, sorted=True).indices.tolist()
        kept = list(outliers)
        if plus:
            step = int(1 / ratio) if ratio > 0 else t
            for c in range(int(step / 6), t - 1, max(1, int(step / 3))):
                if c not in outliers:
                    kept.append(c)
        pruned = [j for j in range(t) if j not in kept]
        for pos, i in enumerate(kept):
            rest = kept[:pos] + kept[pos + 1 :] + pruned
            k = min(cluster_size, len(rest))
            center = x[i].clone()
            if k > 0:
                sims = torch.stack([torch.dot(kn[i], kn[j]) for j in rest])
                for r in torch.topk(sims, k, largest=True).indices.tolist():
                    center = center + s[rest[r]] * x[rest[r]]
            out.append(center)
            frame_ids.append(f)
            patch_ids.append(i)
        if pruned:
            extra = torch.zeros_like(x[0])
            for j in pruned:
                extra = extra + s[j] * x[j]
            out.append(extra)
            frame_ids.append(f)
            patch_ids.append(-1)
        counts.append(len(kept) + int(bool(pruned)))
    return torch.stack(out).to(features.dtype), counts, frame_ids, patch_ids, ratio


def _random_inputs(seed: int, f: int, t: int, d: int = 8, c: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(f, t, generator=g)
    spikes = torch.rand(f, t, generator=g) < 0.08
    logits = logits + 4.0 * spikes  # a few clear outliers per frame
    scores = torch.softmax(logits, dim=-1)
    keys = torch.randn(f, t, c, generator=g)
    features = torch.randn(f, t, d, generator=g)
    return features, scores, keys


# --------------------------------------------------------------------------------------------------
# IQR ratio


def test_iqr_ratio_by_hand() -> None:
    # sorted 1..6, 100, 200: Q1 = 2 + 0.75 * 1 = 2.75, Q3 = 6 + 0.25 * 94 = 29.5, upper = 29.5 + 1.5 * 26.75
    # = 69.625: two values above -> 2/8.
    assert iqr_outlier_ratio(torch.tensor([5.0, 200.0, 1.0, 6.0, 100.0, 2.0, 4.0, 3.0])) == 0.25
    # 1..8: Q1 = 2.75, Q3 = 6.25, upper = 11.5: none.
    assert iqr_outlier_ratio(torch.arange(1.0, 9.0)) == 0.0
    # Strictly greater: all equal -> IQR 0, upper = the value itself, nothing above it.
    assert iqr_outlier_ratio(torch.full((4, 5), 0.2)) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_iqr_ratio_matches_numpy_percentile(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.lognormal(0.0, 1.0, size=(7, 49)).astype(np.float32)
    flat = values.astype(np.float64).ravel()
    q1, q3 = np.percentile(flat, 25), np.percentile(flat, 75)
    expected = float(np.sum(flat > q3 + 1.5 * (q3 - q1))) / flat.size
    assert expected > 0
    assert iqr_outlier_ratio(torch.from_numpy(values)) == expected


def test_iqr_ratio_is_over_all_frames_together() -> None:
    # Frame 0 alone: 0.25 (see above). Frame 1 alone: seven 1s and 1.5 -> Q1 = Q3 = 1, 1.5 > 1 -> 1/8.
    # Together (16 values: eight 1s, then 1.5, 2, 3, 4, 5, 6, 100, 200):
    # Q1 = 1 (position 3.75), Q3 = 4 + 0.25 * 1 = 4.25 (position 11.25), upper = 4.25 + 1.5 * 3.25 = 9.125
    # -> only 100 and 200: 2/16.
    frame0 = [5.0, 200.0, 1.0, 6.0, 100.0, 2.0, 4.0, 3.0]
    frame1 = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5]
    scores = _tensor([frame0, frame1])
    assert iqr_outlier_ratio(scores[0]) == 0.25
    assert iqr_outlier_ratio(scores[1]) == 0.125
    assert iqr_outlier_ratio(scores) == 0.125
    result = prumerge(_features(2, 8), scores, torch.randn(2, 8, 4))
    assert result.ratio == 0.125
    # int(8 * 0.125) = 1 outlier per frame, not the 2 that frame 0's own ratio would give.
    assert result.patch_index.tolist() == [1, -1, 7, -1]
    assert result.tokens_per_frame == [2, 2]


# --------------------------------------------------------------------------------------------------
# Selection


def test_selection_count_and_descending_order() -> None:
    # 16 values 1,1,2,2,...,6,6,100,150,200,300: Q1 = 2.75, Q3 = 6 + 0.25 * 94 = 29.5, upper 69.625 -> 4/16.
    scores = _tensor([[5.0, 200.0, 1.0, 6.0, 100.0, 2.0, 4.0, 3.0], [3.0, 1.0, 300.0, 2.0, 150.0, 4.0, 5.0, 6.0]])
    result = prumerge(_features(2, 8), scores, torch.randn(2, 8, 4))
    assert result.ratio == 0.25
    # n_keep = int(8 * 0.25) = 2 per frame, highest score first, then the extra token.
    assert result.patch_index.tolist() == [1, 4, -1, 2, 4, -1]
    assert result.frame_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert result.tokens_per_frame == [3, 3]


@pytest.mark.parametrize("seed", range(3))
def test_selection_random_same_count_every_frame(seed: int) -> None:
    features, scores, keys = _random_inputs(seed, 4, 49)
    result = prumerge(features, scores, keys)
    n_keep = max(1, int(49 * result.ratio))
    assert result.tokens_per_frame == [n_keep + 1] * 4
    for f in range(4):
        rows = result.patch_index[result.frame_index == f].tolist()
        assert rows[-1] == -1
        expected = sorted(range(49), key=lambda j: -float(scores[f, j]))[:n_keep]
        assert rows[:-1] == expected


def test_keep_count_zero_is_clamped_to_one() -> None:
    # 1..8: ratio 0 -> int(8 * 0) = 0 -> keep the top token anyway.
    result = prumerge(_features(1, 8), torch.arange(1.0, 9.0).unsqueeze(0), torch.randn(1, 8, 4))
    assert result.ratio == 0.0
    assert result.patch_index.tolist() == [7, -1]
    # Ratio > 0 but int(T * ratio) == 0: 1,1,2,2,3,3,4,100 -> Q1 = 1.75, Q3 = 3.25, upper = 5.5 -> 1/8, and
    # int(4 * 0.125) = 0.
    scores = _tensor([[1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 3.0, 4.0]])
    result = prumerge(_features(2, 4), scores, torch.randn(2, 4, 4))
    assert result.ratio == 0.125
    assert result.patch_index.tolist() == [3, -1, 3, -1]
    assert result.tokens_per_frame == [2, 2]


# --------------------------------------------------------------------------------------------------
# PruMerge+


def _plus_scores() -> torch.Tensor:
    # Each frame: 1..18 plus 100 and 200 (T = 20). Together: Q1 = 5.75, Q3 = 15.25, upper = 29.5 ->
    # 4/40 = 0.1 -> n_keep = 2, step = int(1 / 0.1) = 10, candidates range(1, 19, 3) = 1, 4, 7, 10, 13, 16.
    frame0 = [float(v) for v in range(1, 19)]
    frame0.insert(4, 200.0)
    frame0.insert(11, 100.0)  # outliers at 4 and 11
    frame1 = [200.0, *[float(v) for v in range(1, 19)], 100.0]  # outliers at 0 and 19
    return _tensor([frame0, frame1])


def test_plus_adds_uniform_samples_by_hand() -> None:
    scores = _plus_scores()
    assert scores[0, 4] == 200 and scores[0, 11] == 100
    result = prumerge(_features(2, 20), scores, torch.randn(2, 20, 4), plus=True)
    assert result.ratio == 0.1
    # Frame 0: 4 is already an outlier, so it is not added twice. Frame 1: all six are new.
    assert result.patch_index.tolist() == [4, 11, 1, 7, 10, 13, 16, -1, 0, 19, 1, 4, 7, 10, 13, 16, -1]
    assert result.tokens_per_frame == [8, 9]
    assert result.frame_index.tolist() == [0] * 8 + [1] * 9
    plain = prumerge(_features(2, 20), scores, torch.randn(2, 20, 4))
    assert plain.patch_index.tolist() == [4, 11, -1, 0, 19, -1]


def test_plus_with_no_outlier_uses_step_t() -> None:
    # 1..8: ratio 0 -> step = T = 8 -> range(1, 7, 2) = 1, 3, 5 after the clamped top token 7.
    result = prumerge(_features(1, 8), torch.arange(1.0, 9.0).unsqueeze(0), torch.randn(1, 8, 4), plus=True)
    assert result.patch_index.tolist() == [7, 1, 3, 5, -1]


def test_plus_candidate_stride_guard() -> None:
    assert _plus_candidates(20, 0.1) == [1, 4, 7, 10, 13, 16]
    assert _plus_candidates(8, 0.0) == [1, 3, 5]
    # step = 2 < 3: int(2 / 3) = 0 would be a zero stride; the guard makes it 1.
    assert _plus_candidates(6, 0.5) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# Merge weights, by hand


def _merge_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # T = 8, D = 2. Scores k/64 (exact in binary): 1..6, 24, 32. Q1 = 2.75/64, Q3 = 10.5/64, upper 22.125/64
    # -> tokens 7 (32) and 6 (24) are kept, in that order.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 24.0, 32.0]]) / 64
    features = _tensor([[[1, 0], [0, 1], [1, 1], [2, 0], [0, 2], [2, 2], [3, 1], [1, 3]]]).reshape(1, 8, 2)
    keys = _tensor(
        [
            [
                [1, 0, 0.5, 0],  # 0: cos 0.894 with key 7, 0.4 with key 6
                [0, 1, 0, 0],  # 1: cos 0.894 with key 6
                [0, 1, 0, 0.1],  # 2: cos 0.890 with key 6
                [0, 0, 1, 0],
                [0, 0, 0, 1],
                [0, 0, 1, 1],
                [0.5, 1, 0, 0],  # 6 (kept): cos 0.447 with key 7
                [1, 0, 0, 0],  # 7 (kept)
            ]
        ]
    )
    return features, scores, keys


def test_merge_weights_by_hand_small_cluster() -> None:
    features, scores, keys = _merge_case()
    result = prumerge(features, scores, keys, cluster_size=2)
    # Token 7's two nearest keys: 0 and 6, a *kept* token (the reference's quirk), weights the raw scores:
    # [1, 3] + 24/64 * [3, 1] + 1/64 * [1, 0] = [137, 216] / 64.
    # Token 6's: 1 and 2: [3, 1] + 2/64 * [0, 1] + 3/64 * [1, 1] = [195, 69] / 64.
    # Extra: sum over pruned 0..5 of s_j x_j = ([1, 0] + 2 [0, 1] + 3 [1, 1] + 4 [2, 0] + 5 [0, 2] + 6 [2, 2]) / 64.
    expected = _tensor([[137, 216], [195, 69], [24, 27]]) / 64
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-6)
    assert result.patch_index.tolist() == [7, 6, -1]
    assert result.tokens_per_frame == [3]


def test_merge_cluster_capped_at_rest() -> None:
    features, scores, keys = _merge_case()
    result = prumerge(features, scores, keys)  # cluster_size 32 > 7 rest tokens: everyone else is merged
    # Token 7: x7 + extra + s6 x6 = [1, 3] + [24, 27]/64 + [72, 24]/64; token 6: x6 + extra + s7 x7.
    expected = _tensor([[160, 243], [248, 187], [24, 27]]) / 64
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-6)


def test_nothing_pruned_omits_extra_token() -> None:
    # T = 1: the single token is kept, its cluster is empty, no extra token.
    features = torch.randn(2, 1, 3)
    result = prumerge(features, _tensor([[0.5], [0.7]]), torch.randn(2, 1, 2))
    torch.testing.assert_close(result.tokens, features.reshape(2, 3), rtol=0, atol=0)
    assert result.tokens_per_frame == [1, 1]
    assert result.patch_index.tolist() == [0, 0]
    # T = 3, PruMerge+: ratio 0 -> step 3 -> candidates 0, 1 after the top token 2: all kept; each token
    # merges the other two (k = min(32, 2)).
    x = _tensor([[[1, 0], [0, 1], [1, 1]]])
    s = _tensor([[0.25, 0.5, 0.75]])
    result = prumerge(x, s, torch.randn(1, 3, 2), plus=True)
    assert result.patch_index.tolist() == [2, 0, 1]
    assert result.tokens_per_frame == [3]
    # x2 + 0.25 x0 + 0.5 x1; x0 + 0.5 x1 + 0.75 x2; x1 + 0.25 x0 + 0.75 x2.
    expected = _tensor([[1.25, 1.5], [1.75, 1.25], [1.0, 1.75]])
    torch.testing.assert_close(result.tokens, expected, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Against the slow reference


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_matches_slow_reference(seed: int, plus: bool) -> None:
    features, scores, keys = _random_inputs(seed, 3, 49)
    cluster_size = (32, 5, 1, 48)[seed]
    result = prumerge(features, scores, keys, plus=plus, cluster_size=cluster_size)
    tokens, counts, frame_ids, patch_ids, ratio = slow_prumerge(features, scores, keys, plus, cluster_size)
    assert result.ratio == ratio
    assert result.tokens_per_frame == counts
    assert result.frame_index.tolist() == frame_ids
    assert result.patch_index.tolist() == patch_ids
    torch.testing.assert_close(result.tokens, tokens)


def test_bf16_features_and_positions() -> None:
    features, scores, keys = _random_inputs(7, 4, 36, d=16)
    features = features.to(torch.bfloat16)
    result = prumerge(features, scores, keys.to(torch.bfloat16), plus=True)
    assert result.tokens.dtype == torch.bfloat16
    n = result.tokens.shape[0]
    assert sum(result.tokens_per_frame) == n
    assert result.frame_index.shape == result.patch_index.shape == (n,)
    assert result.frame_index.dtype == result.patch_index.dtype == torch.long
    tokens, counts, frame_ids, patch_ids, _ = slow_prumerge(features, scores, keys.to(torch.bfloat16), True, 32)
    assert result.tokens_per_frame == counts
    assert result.frame_index.tolist() == frame_ids
    assert result.patch_index.tolist() == patch_ids
    torch.testing.assert_close(result.tokens, tokens)
    # Frame by frame, each frame's kept patches are distinct and its extra token (-1) comes last.
    for f, count in enumerate(result.tokens_per_frame):
        patches = result.patch_index[result.frame_index == f].tolist()
        assert len(patches) == count
        assert patches[-1] == -1
        assert len(set(patches[:-1])) == count - 1


def test_kept_tokens_come_from_their_own_frame() -> None:
    # Orthogonal keys per token (cluster_size 1 picks some other token); with zero scores nothing is added,
    # so each kept token is exactly its source feature.
    features = _features(3, 8)
    scores = torch.zeros(3, 8)
    scores[:, 5] = 1.0
    result = prumerge(features, scores, torch.eye(8).expand(3, 8, 8), cluster_size=1)
    kept = result.patch_index >= 0
    torch.testing.assert_close(
        result.tokens[kept], features[result.frame_index[kept], result.patch_index[kept]], rtol=0, atol=0
    )


# --------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("features", "scores", "keys", "message"),
    [
        (torch.zeros(8, 3), torch.zeros(1, 8), torch.zeros(1, 8, 2), r"features must have shape \(F, T, D\)"),
        (torch.zeros(2, 8, 3), torch.zeros(2, 7), torch.zeros(2, 8, 2), r"scores must have shape \(F, T\) = \(2, 8\)"),
        (torch.zeros(2, 8, 3), torch.zeros(3, 8), torch.zeros(2, 8, 2), r"scores must have shape \(F, T\) = \(2, 8\)"),
        (torch.zeros(2, 8, 3), torch.zeros(2, 8), torch.zeros(2, 9, 2), r"keys must have shape \(F, T, C\)"),
        (torch.zeros(2, 8, 3), torch.zeros(2, 8), torch.zeros(2, 8), r"keys must have shape \(F, T, C\)"),
        (torch.zeros(2, 8, 3), torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, 2), "floating-point"),
        (torch.zeros(0, 8, 3), torch.zeros(0, 8), torch.zeros(0, 8, 2), "F >= 1 frames"),
        ([[1.0]], torch.zeros(1, 1), torch.zeros(1, 1, 1), "features must be a torch.Tensor"),
    ],
)
def test_bad_shapes_raise(features: object, scores: torch.Tensor, keys: torch.Tensor, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        prumerge(features, scores, keys)  # type: ignore[arg-type]


@pytest.mark.parametrize("cluster_size", [0, -1, True, 2.5])
def test_bad_cluster_size_raises(cluster_size: object) -> None:
    with pytest.raises(ConfigError, match="cluster_size must be an integer >= 1"):
        prumerge(torch.zeros(1, 4, 2), torch.zeros(1, 4), torch.zeros(1, 4, 2), cluster_size=cluster_size)  # type: ignore[arg-type]


def test_iqr_ratio_rejects_empty() -> None:
    with pytest.raises(ConfigError, match="non-empty floating-point"):
        iqr_outlier_ratio(torch.zeros(0))
