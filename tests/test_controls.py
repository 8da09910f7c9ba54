"""Equal-budget controls (random tokens, uniform frames) and every method from every entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from dycoke.compress.budget import random_token_indices, uniform_frame_indices
from dycoke.compress.ttm import ttm_token_count
from dycoke.config import METHODS, GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.errors import ConfigError
from dycoke.methods.controls import budget_count
from dycoke.pipeline import PreparedVideo, VideoQA
from tests.videos import textured_frames, write_video

runner = CliRunner()


def test_random_choice_is_seeded_sorted_and_device_independent() -> None:
    a = random_token_indices(100, 10, seed=3)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 10
    assert torch.equal(a, random_token_indices(100, 10, seed=3))
    assert not torch.equal(a, random_token_indices(100, 10, seed=4))
    assert random_token_indices(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"token budget must be in \[1, 100\] frame tokens, got 0"):
        random_token_indices(100, 0, seed=0)


@pytest.mark.parametrize("frames", [1, 2, 7, 32, 64])
def test_uniform_frames_follow_the_paper_sampling_rule(frames: int) -> None:
    for kept in range(1, frames + 1):
        expected = [int(i) for i in np.linspace(0, frames - 1, kept, dtype=int)]
        assert uniform_frame_indices(frames, 196, kept * 196) == expected
    assert uniform_frame_indices(frames, 196, 10**9) == list(range(frames))  # never more than F


def test_budget_defaults_to_dycoke_count() -> None:
    assert budget_count(MethodOptions(method="random"), 32, 196) == ttm_token_count(32, 196, 0.7) == 3098
    assert budget_count(MethodOptions(method="random", merge_ratio=0.5), 16, 196) == ttm_token_count(16, 196, 0.5)
    assert budget_count(MethodOptions(method="random", budget_tokens=3099), 32, 196) == 3098  # newline counted
    assert budget_count(MethodOptions(method="uniform", budget_ratio=0.25), 32, 196) == 1568
    assert uniform_frame_indices(32, 196, 3098) == [int(i) for i in np.linspace(0, 31, 16, dtype=int)]
    with pytest.raises(ConfigError, match="give --budget-tokens or --budget-ratio, not both"):
        MethodOptions(method="random", budget_tokens=10, budget_ratio=0.5)
    with pytest.raises(ConfigError, match=r"budget-ratio must be in \(0.0, 1.0\], got 1.5"):
        MethodOptions(method="random", budget_ratio=1.5)


@pytest.fixture(scope="module")
def qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("ctl") / "clip.mp4", textured_frames(16, 96, 128, seed=8), fps=8)


@pytest.fixture(scope="module")
def prepared(qa: VideoQA, clip: Path) -> PreparedVideo:
    return qa.prepare(clip, VideoOptions(num_frames=8), with_signals=True)


def run(method: str, **kwargs: Any) -> RunOptions:
    return RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=6, min_new_tokens=6),
        method=MethodOptions(method=method, **kwargs),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("method", ["random", "uniform"])
def test_keeping_everything_is_the_full_path(qa: VideoQA, prepared: PreparedVideo, method: str) -> None:
    full = qa.answer(prepared, "What moves?", run("full"))
    control = qa.answer(prepared, "What moves?", run(method, budget_ratio=1.0))
    assert control.token_ids == full.token_ids and control.tokens.visual == full.tokens.visual


def test_controls_match_dycoke_budget(qa: VideoQA, prepared: PreparedVideo) -> None:
    dycoke = qa.answer(prepared, "What moves?", run("dycoke", prune_layer=2))
    rand = qa.answer(prepared, "What moves?", run("random"))
    uni = qa.answer(prepared, "What moves?", run("uniform"))
    assert rand.tokens.visual == dycoke.tokens.visual == 879  # 8 frames, K=0.7: 878 merged + newline
    assert sum(rand.tokens.visual_per_frame) == 878 and rand.compression["budget_tokens"] == 879
    assert uni.tokens.visual == 4 * 196 + 1  # round(878 / 196) = 4 whole frames
    assert uni.compression["frames_kept"] == [0, 2, 4, 7] == [int(i) for i in np.linspace(0, 7, 4, dtype=int)]
    assert uni.tokens.visual_per_frame == [196, 0, 196, 0, 196, 0, 0, 196]


def test_every_method_from_ask_compare_and_batch(tiny_checkpoint: Path, clip: Path, tmp_path: Path) -> None:
    common = ["--model", str(tiny_checkpoint), "--frames", "8", "--max-new-tokens", "3", "-L", "2"]
    for method in METHODS:
        result = runner.invoke(app, ["ask", str(clip), "What?", "--method", method, "--json", *common])
        assert result.exit_code == 0, (method, result.stderr)
        assert json.loads(result.stdout)["method"] == method
    every = ",".join(METHODS)
    result = runner.invoke(app, ["ask", str(clip), "What?", "--compare", every, "--json", *common])
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(result.stdout)["reports"]) == list(METHODS)
    questions = tmp_path / "q.csv"
    questions.write_text(f"video,question\n{clip},What?\n{clip},Why?\n")
    out = tmp_path / "a.jsonl"
    result = runner.invoke(app, ["batch", str(questions), "--out", str(out), "--compare", every, "-b", "2", *common])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["id"], r["method"]) for r in records) == sorted((i, m) for i in ("1", "2") for m in METHODS)


def test_vision_probe_matches_the_towers_own_attention_weights(qa: VideoQA, prepared: PreparedVideo) -> None:
    """The PruMerge signals equal what the vision tower reports with output_attentions (eager)."""
    model = qa.loaded.model
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    assert layer == -1
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = tower(prepared.pixels, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation(previous)
    received = out.attentions[-1].float().mean(dim=(1, 2))  # (F, N): heads, then queries
    encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
    last = encoder.layers[-1]
    with torch.inference_mode():
        keys = last.self_attn.k_proj(last.layer_norm1(out.hidden_states[-2]))  # (F, N, C), heads concatenated
    assert prepared.vision is not None
    pool = model.model.apply_pooling
    torch.testing.assert_close(prepared.vision.scores, pool(received.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(prepared.vision.keys, pool(keys.float()))


def test_prumerge_plus_adds_samples_and_the_summary_names_each_method(tiny_checkpoint: Path, clip: Path) -> None:
    common = ["ask", str(clip), "What?", "--model", str(tiny_checkpoint), "--frames", "8", "--max-new-tokens", "2"]
    plain = json.loads(runner.invoke(app, [*common, "--method", "prumerge", "--json"]).stdout)
    plus = json.loads(runner.invoke(app, [*common, "--method", "prumerge", "--prumerge-plus", "--json"]).stdout)
    assert plus["compression"]["prumerge_plus"] and not plain["compression"]["prumerge_plus"]
    assert plus["tokens"]["visual"] > plain["tokens"]["visual"]
    expected = {
        "fastv": "FastV: kept from layer 2",
        "prumerge": "IQR outlier ratio",
        "random": "budget (visual tokens)",
        "uniform": "frames [0, 2, 4, 7]",
    }
    for method, text in expected.items():
        result = runner.invoke(app, [*common, "--method", method])
        assert result.exit_code == 0 and text in result.stderr, (method, result.stderr)


def test_the_default_budget_of_a_short_video_is_every_token() -> None:
    """DyCoke keeps a video of at most 4 frames whole, so the equal-budget controls do too."""
    assert budget_count(MethodOptions(method="random"), 4, 196) == 4 * 196
    assert budget_count(MethodOptions(method="uniform"), 5, 196) == 196 + 58 + 58 + 58 + 0
