"""Helpers of the benchmark scripts that decide what gets measured (pure functions, CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_stack_timeline_groups_runs_and_shows_gaps() -> None:
    from benchmarks.sample_stacks import timeline, where

    importing = ["<frozen importlib._bootstrap>:1 _load", "torch/__init__.py:5 <module>", "cli/common.py:70 load"]
    loading = ["transformers/modeling_utils.py:9 from_pretrained", "dycoke/model.py:240 _from_state_dict"]
    assert where(importing) == "cli/common.py:70 load | torch/__init__.py:5 | torch/__init__.py:5 <module>"
    samples = [{"t": t, "thread": "MainThread", "stack": importing} for t in (0.1, 0.2, 0.3)]
    samples += [{"t": t, "thread": "MainThread", "stack": loading} for t in (1.0, 1.1)]
    samples += [{"t": 0.2, "thread": "dycoke-weights", "stack": loading}]
    lines = timeline(samples, 0.1)
    assert lines[0] == "== MainThread"
    assert lines[1].split() == ["0.10", "+", "0.30s", *where(importing).split()]
    assert "(no sample: the GIL was held)" in lines[2] and "+ 0.70s" in lines[2]
    assert lines[3].split()[:3] == ["1.00", "+", "0.20s"]
    assert lines[4] == "== dycoke-weights" and len(lines) == 6
    coarse = timeline(samples, 0.1, coarse=True)
    assert coarse[1].endswith("cli/common.py:70 load") and coarse[3].endswith("dycoke/model.py:240 _from_state_dict")


def test_children_import_from_a_bytecode_cache_unless_told_as_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from benchmarks.bytecode import child_environment

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    cached = child_environment("cached", tmp_path / "pyc", {"EXTRA": "1"})
    assert "PYTHONDONTWRITEBYTECODE" not in cached and cached["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pyc")
    assert cached["EXTRA"] == "1"
    found = child_environment("as-found", tmp_path / "pyc")
    assert found["PYTHONDONTWRITEBYTECODE"] == "1" and "PYTHONPYCACHEPREFIX" not in found


def test_cold_runs_take_every_configuration_in_turn_within_each_repeat() -> None:
    from benchmarks.bench_cold import run_order

    order = run_order(2, ["full", "dycoke"], ["on", "off"])
    one = [None, ("full", "on"), ("full", "off"), ("dycoke", "on"), ("dycoke", "off")]
    assert order == one + one


def test_a_child_under_the_hiding_environment_sees_only_the_declared_distributions(tmp_path: Path) -> None:
    """The closure holds the project's dependencies and theirs, not its test extras; a child under
    the hiding environment cannot import an undeclared module and still imports a declared one."""
    import subprocess
    import sys

    from benchmarks.installed import declared_closure, hiding_environment, undeclared_modules

    closure = declared_closure()
    assert {"torch", "transformers", "typer", "decord", "av"} <= closure
    assert "pytest" not in closure and "mypy" not in closure
    hidden = undeclared_modules(closure)
    assert "pytest" in hidden and not {"torch", "typer", "dycoke", "cli"} & set(hidden)
    env = {**os.environ, **hiding_environment(hidden, tmp_path / "hide")}
    script = "import importlib.util, typer; print(importlib.util.find_spec('pytest'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "None"
    failed = subprocess.run([sys.executable, "-c", "import pytest"], capture_output=True, text=True, env=env)
    assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr


def test_the_collection_clock_counts_full_collections_and_times_them() -> None:
    import gc

    from benchmarks.bench_question_lengths import CollectionClock

    clock = CollectionClock()
    gc.callbacks.append(clock)
    try:
        gc.collect(0)
        gc.collect()
        gc.collect()
    finally:
        gc.callbacks.remove(clock)
    seen = clock.seen()
    assert seen["gc_full"] == 2 and seen["gc_s"] > 0
    clock.reset()
    assert clock.seen() == {"gc_full": 0, "gc_s": 0.0}


def test_per_step_kernel_times_are_the_difference_of_two_runs_over_their_steps() -> None:
    from benchmarks.profile_step import per_step

    long = {"families": {"gemm": 10.0, "triton": 1.0}, "names": {"gemv": (10.0, 68), "norm": (1.0, 34)}}
    short = {"families": {"gemm": 2.0}, "names": {"gemv": (2.0, 4)}}
    families, top = per_step(long, short, steps=32, most=1)
    assert families == {"gemm": 0.25, "triton": 1.0 / 32}
    assert top == [(0.25, 2, "gemv")]


def test_the_end_to_end_chart_shows_32_frames_or_the_smallest_run() -> None:
    from benchmarks.bench_e2e import chart_frames

    assert chart_frames([16, 32, 64, 128]) == 32
    assert chart_frames([8, 16]) == 16
    assert chart_frames([128, 64]) == 64  # a run of larger counts only (it raised before)


def test_the_mean_pruned_share_counts_dp_records_only(tmp_path: Path) -> None:
    from benchmarks.bench_batch import mean_pruned_share

    records = tmp_path / "r.jsonl"
    rows = [{"compression": {"pruned_step_share": 0.25}}, {"compression": {"pruned_step_share": 0.75}}, {"error": "x"}]
    records.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert mean_pruned_share(records) == 0.5
    records.write_text(json.dumps({"compression": {"kept": 3}}) + "\n")
    assert mean_pruned_share(records) is None
