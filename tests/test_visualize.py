"""What-was-kept pictures: the patch geometry, the dimmed pixels, and every entry point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from dycoke.compress.ttm import temporal_token_merge_with_positions
from dycoke.errors import ConfigError
from dycoke.preprocess import PreprocessConfig, preprocess_frames
from dycoke.report import Trace
from dycoke.visualize import DIM, kept_masks, patch_box, render, save_png
from tests.videos import textured_frames, write_video

runner = CliRunner()


def test_patch_box_tiles_the_seen_part_of_the_frame() -> None:
    assert patch_box(0, 14, 480, 640) == (0, 0, 45, 34)  # 640 * 378/384 / 14 = 45.0
    assert patch_box(195, 14, 480, 640) == (585, 439, 630, 472)
    covered = np.zeros((480, 640), dtype=int)
    for patch in range(196):
        x0, y0, x1, y1 = patch_box(patch, 14, 480, 640)
        covered[y0:y1, x0:x1] += 1
    assert (covered[:472, :630] == 1).all()  # every seen pixel in exactly one cell
    assert (covered[472:] == 0).all() and (covered[:, 630:] == 0).all()  # the unseen 6/384 margin


@pytest.fixture(scope="module")
def apply_pooling(tiny_checkpoint: Path) -> Any:
    """The model's own video pooling (27x27 -> 14x14, bilinear); the tiny checkpoint has the real geometry."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint).model.apply_pooling


@pytest.mark.parametrize("cell", [(0, 0), (3, 11), (7, 7), (13, 2)])
def test_a_painted_cell_lands_in_the_same_pooled_token(cell: tuple[int, int], apply_pooling: Any) -> None:
    """Paint cell (r, c) of a 480x640 frame, run the model's geometry (384x384 resize, 14 px patches,
    27x27 grid pooled by the model's own pooling to 14x14): the pooled token with the most paint is (r, c)."""
    row, col = cell
    frame = np.zeros((1, 480, 640, 3), dtype=np.uint8)
    x0, y0, x1, y1 = patch_box(row * 14 + col, 14, 480, 640)
    frame[0, y0:y1, x0:x1] = 255
    pixels = preprocess_frames(frame, PreprocessConfig())  # (1, 3, 384, 384), normalised
    brightness = pixels.mean(dim=1)[0]  # (384, 384)
    patches = brightness[:378, :378].reshape(27, 14, 27, 14).mean(dim=(1, 3)).reshape(1, 729, 1)
    with torch.inference_mode():
        pooled = apply_pooling(patches).reshape(196)
    assert int(pooled.argmax()) == row * 14 + col


def test_ttm_keeps_the_changed_cell_and_the_picture_dims_the_rest(tmp_path: Path) -> None:
    """Features where only cell 37 changes between frames: TTM keeps it in the merged frame, and in the
    PNG every other cell of that frame is dimmed while cell 37 is not."""
    f, t, d = 2, 196, 8
    features = torch.ones(f, t, d)
    features[1, 37] = torch.tensor([1.0, -1.0] * 4)  # the only cell that differs from frame 0
    merged = temporal_token_merge_with_positions(features.reshape(f * t, d), 0.99, t)  # keep int(0.01*196) = 1
    kept = list(zip(merged.frame_index.tolist(), merged.patch_index.tolist(), strict=True))
    assert kept[-1] == (1, 37) and len([k for k in kept if k[0] == 1]) == 1
    frames = np.full((f, 280, 280, 3), 200, dtype=np.uint8)
    trace = Trace(method="dycoke", frames=frames, tokens_per_frame=t, grid=14, kept=kept)
    assert kept_masks(kept, f, 14)[1].sum() == 1
    out = save_png([trace], tmp_path / "kept.png")
    image = np.asarray(Image.open(out).convert("RGB")).astype(float)
    # locate frame 1's thumbnail: the second one in the row (176 px wide, 8 px margins, 28 px of title)
    thumb = image[28 : 28 + 176, 8 + 176 + 8 : 8 + 176 + 8 + 176].mean(axis=2)
    cell = 176 * 378 / 384 / 14
    r, c = divmod(37, 14)
    inside = thumb[int(r * cell) + 3 : int((r + 1) * cell) - 3, int(c * cell) + 3 : int((c + 1) * cell) - 3]
    outside = thumb[int(8 * cell) + 3 : int(9 * cell) - 3, int(8 * cell) + 3 : int(9 * cell) - 3]
    assert inside.mean() == pytest.approx(200, abs=3)
    assert outside.mean() == pytest.approx(200 * DIM, abs=3)
    seen = int(176 * 378 / 384) - 2
    first = image[28 : 28 + 176, 8 : 8 + 176].mean(axis=2)  # frame 0 is kept whole ...
    assert first[:seen, :seen].mean() == pytest.approx(200, abs=3)
    assert first[:, seen + 4 :].mean() == pytest.approx(200 * DIM, abs=3)  # ... but for the never-seen margin


def test_decode_strips_are_drawn_for_dycoke_only() -> None:
    frames = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    kept = [(0, p) for p in range(196)] + [(1, 5)]
    plain = render([Trace("random", frames, 196, 14, kept)])
    with_steps = render(
        [Trace("dycoke", frames, 196, 14, kept, step_attention=[[0.9, 0.1]] * 5, step_kept=[[58, 1]] * 5, late_layer=3)]
    )
    assert with_steps.height > plain.height


def test_save_png_checks_the_path(tmp_path: Path) -> None:
    trace = Trace("full", np.zeros((1, 8, 8, 3), dtype=np.uint8), 196, 14, [(0, 0)])
    with pytest.raises(ConfigError, match=r"must be a \.png file, got 'a\.jpg'"):
        save_png([trace], tmp_path / "a.jpg")


def test_show_tokens_from_ask_compare_and_batch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    clip = write_video(tmp_path / "c.mp4", textured_frames(8, 96, 128, seed=2), fps=8)
    common = ["--model", str(tiny_checkpoint), "--frames", "4", "--max-new-tokens", "4", "-L", "2", "-q"]
    ask = runner.invoke(app, ["ask", str(clip), "What?", *common, "--show-tokens", str(tmp_path / "a.png")])
    assert ask.exit_code == 0, ask.stderr
    assert Image.open(tmp_path / "a.png").size[0] > 0
    cmp = runner.invoke(
        app,
        [
            "ask",
            str(clip),
            "What?",
            *common,
            "--compare",
            "full,dycoke,fastv",
            "--show-tokens",
            str(tmp_path / "c.png"),
        ],
    )
    assert cmp.exit_code == 0, cmp.stderr
    assert Image.open(tmp_path / "c.png").size[1] > Image.open(tmp_path / "a.png").size[1]
    bad = runner.invoke(app, ["ask", str(clip), "What?", *common, "--show-tokens", str(tmp_path / "a.gif")])
    assert bad.exit_code == 2 and "show-tokens must name a .png file" in bad.stderr
    (tmp_path / "q.csv").write_text("id,video,question\nq1,c.mp4,What?\n")
    (tmp_path / "pics").mkdir()
    out = tmp_path / "a.jsonl"
    batch = runner.invoke(
        app, ["batch", str(tmp_path / "q.csv"), "--out", str(out), *common, "--show-tokens-dir", str(tmp_path / "pics")]
    )
    assert batch.exit_code == 0, batch.stderr
    assert (tmp_path / "pics" / "q1.dycoke.png").is_file()
    assert "trace" not in json.loads(out.read_text().splitlines()[0])


def test_nothing_is_recorded_unless_asked(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
    from dycoke.methods.dycoke import DyCoke
    from dycoke.pipeline import VideoQA

    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))
    clip = write_video(tmp_path / "c.mp4", textured_frames(8, 96, 128, seed=2), fps=8)
    run = RunOptions(
        video=VideoOptions(num_frames=4),
        generation=GenerationOptions(max_new_tokens=3, min_new_tokens=3),
        method=MethodOptions(prune_layer=2),
    )
    assert qa.ask(clip, "What?", run).trace is None
    recorded = qa.ask(clip, "What?", run, record=True).trace
    assert recorded is not None and len(recorded.step_attention) == 2  # 3 tokens: 2 decode steps
    assert not DyCoke(run.method, qa.loaded.model).record
