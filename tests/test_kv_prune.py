"""Exact checks of DyCoke stage II's math on synthetic tensors."""

from __future__ import annotations

import pytest
import torch

from dycoke.compress.kv_prune import (
    PruneState,
    gate_similarity,
    head_mean_attention,
    keep_count,
    span_indices,
    top_keep,
)


def test_keep_count_truncates_like_the_reference() -> None:
    assert keep_count(3097, 0.7) == int(3097 * (1 - 0.7)) == 929
    assert keep_count(10, 0.0) == 10
    assert keep_count(10, 0.75) == 2


def test_head_mean_attention_matches_explicit_gqa_softmax() -> None:
    torch.manual_seed(0)
    b, hq, hkv, s, d = 2, 6, 2, 9, 4
    q = torch.randn(b, hq, 1, d)
    k = torch.randn(b, hkv, s, d)
    got = head_mean_attention(q, k, scaling=0.5)
    k_rep = k.repeat_interleave(hq // hkv, dim=1)  # head h uses kv head h // group
    expected = torch.softmax((q @ k_rep.transpose(-1, -2)) * 0.5, dim=-1).mean(dim=1).squeeze(1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(b))


def test_head_mean_attention_respects_boolean_mask() -> None:
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 1, 5, 4)
    mask = torch.tensor([[False, True, True, False, True]]).reshape(1, 1, 1, 5)
    got = head_mean_attention(q, k, scaling=1.0, mask=mask)
    assert got[0, 0] == 0 and got[0, 3] == 0
    torch.testing.assert_close(got.sum(), torch.tensor(1.0))


def test_gate_is_zero_on_first_step_and_cosine_after() -> None:
    cur = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert torch.equal(gate_similarity(cur, None), torch.zeros(2))
    prev = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    torch.testing.assert_close(gate_similarity(cur, prev), torch.tensor([0.0, 1.0]))


def test_top_keep_marks_the_most_attended() -> None:
    att = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.4, 0.3, 0.2, 0.1]])
    assert top_keep(att, 2).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert not top_keep(att, 0).any()


def test_span_indices_per_sample() -> None:
    assert span_indices(torch.tensor([3, 5]), 3).tolist() == [[3, 4, 5], [5, 6, 7]]


def _state(mode: str = "official", threshold: float = 0.9) -> PruneState:
    return PruneState(starts=torch.tensor([1, 2]), num_candidates=4, keep=2, threshold=threshold, mode=mode)  # type: ignore[arg-type]


def test_official_gate_prunes_first_step_then_nothing_when_pattern_is_stable() -> None:
    state = _state()
    a1 = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.2]])
    kept1 = state.update(a1)
    assert kept1.tolist() == [[False, True, False, True], [True, False, True, False]]
    # same pattern -> cosine 1 >= 0.9 -> official gate keeps everything
    kept2 = state.update(a1 * 2)
    assert kept2.all()
    # a very different pattern for sample 0 only -> sample 0 prunes again, sample 1 does not
    a3 = torch.tensor([[0.9, 0.0, 0.8, 0.0], [0.9, 0.1, 0.5, 0.2]])
    kept3 = state.update(a3)
    assert kept3[0].tolist() == [True, False, True, False] and kept3[1].all()
    assert state.steps == 3
    assert state.pruned_steps().tolist() == [2, 1]
    assert state.attended_sum().tolist() == [2 + 4 + 2, 2 + 4 + 4]


def test_reuse_gate_keeps_previous_selection() -> None:
    state = _state(mode="reuse")
    a1 = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.2]])
    kept1 = state.update(a1)
    kept2 = state.update(a1)
    assert torch.equal(kept1, kept2)


def test_full_mask_hides_only_pruned_visual_positions() -> None:
    state = _state()
    state.update(torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.2]]))
    mask = state.full_mask(kv_length=8)
    # sample 0: span 1..4, keeps candidates 1 and 3 -> positions 2 and 4
    assert mask[0].tolist() == [True, False, True, False, True, True, True, True]
    # sample 1: span 2..5, keeps candidates 0 and 2 -> positions 2 and 4
    assert mask[1].tolist() == [True, True, True, False, True, False, True, True]
    bias = torch.zeros(2, 1, 1, 8)
    bias[1, ..., 7] = float("-inf")  # already hidden: stays so
    later = state.later_bias(bias)
    assert torch.isinf(later[:, 0, 0]).tolist() == [
        [not m for m in mask[0].tolist()],
        [False, False, False, True, False, True, False, True],
    ]


def test_threshold_minus_one_never_prunes() -> None:
    state = _state(threshold=-1.0)
    a = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.2]])
    for _ in range(3):  # no cosine is below -1, not even the first step's 0
        assert state.update(a).all()


@pytest.mark.parametrize("threshold", [1.01])
def test_threshold_above_one_always_prunes(threshold: float) -> None:
    state = _state(threshold=threshold)
    a = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.9, 0.1, 0.5, 0.2]])
    for _ in range(3):
        assert int(state.update(a).sum()) == 4
