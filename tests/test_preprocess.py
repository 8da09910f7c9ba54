"""Preprocessing: shapes and constants exactly; against transformers' own video processor where it runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dycoke.preprocess import PreprocessConfig, preprocess_frames
from tests.videos import textured_frames

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# Measured on the GPU machine (torchvision 0.26, transformers 5.17), 720p textured frames, same device on both
# sides: max 1.5e-5 uint8 levels. The tolerance allows float rounding only.
HF_TOLERANCE = 1e-3 / 127.5


def test_constant_frame_normalises_exactly() -> None:
    frames = np.full((2, 50, 80, 3), 255, dtype=np.uint8)
    frames[1] = 0
    out = preprocess_frames(frames, PreprocessConfig())
    assert out.shape == (2, 3, 384, 384) and out.dtype == torch.float32
    assert torch.equal(out[0], torch.ones(3, 384, 384))
    assert torch.equal(out[1], -torch.ones(3, 384, 384))


def test_frames_already_at_size_are_not_resampled() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (1, 384, 384, 3), dtype=np.uint8)
    out = preprocess_frames(frames, PreprocessConfig())
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    torch.testing.assert_close(out, expected)


def test_resized_values_sit_on_uint8_levels_like_the_hf_processor() -> None:
    frames = textured_frames(1, 120, 160, seed=1)
    out = preprocess_frames(frames, PreprocessConfig())
    levels = (out + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)


def test_cpu_resize_is_torchs_uint8_kernel() -> None:
    frames = textured_frames(2, 200, 300, seed=3)
    out = preprocess_frames(frames, PreprocessConfig())
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    expected = torch.nn.functional.interpolate(x, size=(384, 384), mode="bicubic", antialias=True).float()
    torch.testing.assert_close((out + 1) * 127.5, expected, atol=1e-4, rtol=0)


def test_constants_are_read_from_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 336, "width": 336}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3]})
    )
    config = PreprocessConfig.from_pretrained_dir(tmp_path)
    assert (config.height, config.width, config.mean, config.std) == (336, 336, (0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    assert PreprocessConfig.from_pretrained_dir(tmp_path / "absent") == PreprocessConfig()


def test_bad_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"frames must be \(F, H, W, 3\)"):
        preprocess_frames(np.zeros((4, 4, 3), dtype=np.uint8), PreprocessConfig())


@pytest.mark.skipif(not HAS_TORCHVISION, reason="transformers' video processor needs torchvision")
def test_matches_transformers_video_processor(tiny_checkpoint: Path) -> None:
    from transformers import LlavaOnevisionVideoProcessor

    processor = LlavaOnevisionVideoProcessor.from_pretrained(tiny_checkpoint)
    frames = textured_frames(4, 720, 1280, seed=2)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        theirs = processor(videos=[frames], return_tensors="pt", device=device)["pixel_values_videos"][0].float().cpu()
        ours = preprocess_frames(frames, PreprocessConfig.from_pretrained_dir(tiny_checkpoint), device=device).cpu()
        assert (ours - theirs).abs().max().item() <= HF_TOLERANCE, device
