"""`--compare`: one decoded video, several methods, honest ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app, optional_value_args
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.errors import ConfigError
from dycoke.pipeline import VideoQA
from dycoke.runs.compare import compare, parse_methods
from tests.videos import textured_frames, write_video

runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("cmp") / "clip.mp4", textured_frames(20, 96, 128, seed=4), fps=10)


def test_parse_methods() -> None:
    assert parse_methods(None) == ["full", "dycoke"]
    assert parse_methods("dycoke, full") == ["dycoke", "full"]
    assert parse_methods("full,fastv,prumerge,random,uniform") == ["full", "fastv", "prumerge", "random", "uniform"]
    with pytest.raises(
        ConfigError, match="unknown method 'tome'; allowed: full, dycoke, fastv, prumerge, random, uniform"
    ):
        parse_methods("full,tome")
    with pytest.raises(ConfigError, match="each method once"):
        parse_methods("full,full")
    with pytest.raises(ConfigError, match="at least two methods"):
        parse_methods("dycoke")


def test_compare_can_stand_alone_on_the_command_line() -> None:
    assert optional_value_args(["ask", "v.mp4", "q", "--compare"]) == ["ask", "v.mp4", "q", "--compare", "full,dycoke"]
    assert optional_value_args(["ask", "--compare", "--json", "v", "q"])[2] == "full,dycoke"
    assert optional_value_args(["ask", "--compare", "dycoke,full"]) == ["ask", "--compare", "dycoke,full"]


def test_library_compare_shares_the_video_and_reports_ratios(tiny_checkpoint: Path, clip: Path) -> None:
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))
    options = RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=5, min_new_tokens=5),
        method=MethodOptions(prune_layer=2),
    )
    result = compare(qa, clip, "What is shown?", options, ["full", "dycoke"])
    full, dycoke = result.reports["full"], result.reports["dycoke"]
    assert result.baseline == "full"
    # one decode and encode, shared
    assert full.timings_s.video_decode == dycoke.timings_s.video_decode
    assert full.timings_s.vision_encoder == dycoke.timings_s.vision_encoder
    ratios = result.ratios()
    assert ratios["full"]["visual_tokens"] == 1.0
    assert ratios["dycoke"]["visual_tokens"] == pytest.approx(879 / 1569)
    assert ratios["dycoke"]["kv_cache_bytes"] == pytest.approx(
        dycoke.memory.kv_cache_bytes / full.memory.kv_cache_bytes
    )
    assert ratios["dycoke"]["peak_gpu_bytes"] is None
    assert any("no GPU memory" in note for note in result.notes)


def test_cli_compare_json(tiny_checkpoint: Path, clip: Path) -> None:
    args = ["ask", str(clip), "What is shown?", "--model", str(tiny_checkpoint), "--device", "cpu", "--frames", "8"]
    args += ["--max-new-tokens", "4", "-L", "2", "--compare", "full,dycoke", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["methods"] == ["full", "dycoke"]
    assert set(data["reports"]) == {"full", "dycoke"}
    assert data["reports"]["dycoke"]["tokens"]["visual"] == 879
    assert data["metrics"]["full"]["visual_tokens"] == 1569
    assert 0 < data["ratios"]["dycoke"]["tflops"] < 1


def test_cli_compare_table(tiny_checkpoint: Path, clip: Path) -> None:
    args = ["ask", str(clip), "What is shown?", "--model", str(tiny_checkpoint), "--device", "cpu", "--frames", "8"]
    result = runner.invoke(app, [*args, "--max-new-tokens", "4", "-L", "2", "--compare", "full,dycoke"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("[full] ") and "\n[dycoke] " in result.stdout
    assert "ratios vs full" in result.stderr and "(0.56x)" in result.stderr


def test_cli_compare_bad_method(tiny_checkpoint: Path, clip: Path) -> None:
    result = runner.invoke(app, ["ask", str(clip), "q", "--model", str(tiny_checkpoint), "--compare", "full,zip"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: compare: unknown method 'zip'; allowed: full, dycoke, fastv, prumerge, random, uniform"
    )
