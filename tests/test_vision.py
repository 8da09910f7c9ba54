"""The vision stage computes what the model's own ``get_video_features`` computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.vision import encode_frames, pool_frame_grid


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


def transformers_tokens(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """(F, 3, H, W) -> (F*T, D): the frame tokens of transformers' own ``get_video_features``."""
    out = model.model.get_video_features(
        pixels.unsqueeze(0),
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    tokens = tokens.reshape(-1, tokens.shape[-1])
    frame_tokens = pixels.shape[0] * 196
    return tokens[:frame_tokens]  # 5.2x appends the newline token here, 5.17 in forward


def _pixels(frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, 384, 384, generator=generator) * 2 - 1


def test_pooling_equals_the_models_own(model: Any) -> None:
    generator = torch.Generator().manual_seed(1)
    for grid in (27, 8, 5):  # the real 27x27 grid, and even/odd others
        features = torch.randn(3, grid * grid, 24, generator=generator)
        ours = pool_frame_grid(features, grid)
        config = model.model.config.vision_config
        image_size, patch = config.image_size, config.patch_size
        try:
            config.image_size, config.patch_size = grid, 1  # apply_pooling reads the grid from the config
            theirs = model.model.apply_pooling(features)
        finally:
            config.image_size, config.patch_size = image_size, patch
        assert ours.shape == theirs.shape == (3, ((grid + 1) // 2) ** 2, 24)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_encoded_tokens_equal_get_video_features(model: Any) -> None:
    pixels = _pixels(4)
    with torch.inference_mode():
        tokens, newline, signals = encode_frames(model, pixels, 196)
        reference = transformers_tokens(model, pixels)
    assert signals is None
    assert tokens.shape == (4 * 196, model.config.text_config.hidden_size)
    assert torch.equal(tokens, reference)  # bit for bit: only memory layouts differ
    torch.testing.assert_close(newline[0], model.model.image_newline)


def test_a_wrong_token_count_is_an_error(model: Any) -> None:
    with pytest.raises(ValueError, match="196 tokens per frame, expected 100"), torch.inference_mode():
        encode_frames(model, _pixels(1), 100)
