"""Helpers of the benchmark scripts that decide what gets measured (pure functions, CPU)."""

from __future__ import annotations

import pytest

from benchmarks.bench_batch import largest_fitting


@pytest.mark.parametrize("fits_up_to,limit", [(0, 64), (1, 64), (5, 64), (37, 64), (64, 64), (100, 64), (3, 3)])
def test_largest_fitting_batch_is_found_in_few_trials(fits_up_to: int, limit: int) -> None:
    tried: list[int] = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= fits_up_to

    assert largest_fitting(fits, limit) == min(fits_up_to, limit)
    assert all(1 <= n <= limit for n in tried) and len(tried) == len(set(tried))  # no trial twice
    assert len(tried) <= 2 * limit.bit_length() + 1
