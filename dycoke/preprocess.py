"""Frame preprocessing equivalent to the checkpoint's video processor, in torch, on any device.

LLaVA-OneVision's ``LlavaOnevisionVideoProcessor`` resizes each frame to 384x384 (bicubic, antialias)
with uint8 output, rescales by 1/255 and normalises with the checkpoint's mean/std (0.5/0.5 for the
llava-hf checkpoints). This module does the same on the model's device, so that a GPU does the
resize. The HF processor resizes uint8 with torch's integer kernel on a CPU and in float, rounded back
to uint8 levels, on a GPU; this module does the same on each, and so agrees with it to float rounding
(measured on the GPU machine: max difference 1.5e-5 uint8 levels on both devices; between the two
devices the results differ by up to 8 levels at sharp edges, mean 0.16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dycoke.transfer import to_device

PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize target and normalisation constants of a checkpoint's video processor."""

    height: int = 384
    width: int = 384
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path) -> PreprocessConfig:
        """Read the constants from ``video_preprocessor_config.json`` (or the image processor's file).

        Falls back to the llava-hf defaults when neither file exists.
        """
        for name in PROCESSOR_FILES:
            path = Path(directory) / name
            if path.is_file():
                data = json.loads(path.read_text())
                size = data.get("size") or {}
                height = int(size.get("height", size.get("shortest_edge", cls.height)))
                width = int(size.get("width", size.get("shortest_edge", cls.width)))
                mean = tuple(float(v) for v in data.get("image_mean", cls.mean))
                std = tuple(float(v) for v in data.get("image_std", cls.std))
                return cls(
                    height=height,
                    width=width,
                    mean=(mean[0], mean[1], mean[2]),
                    std=(std[0], std[1], std[2]),
                    rescale_factor=float(data.get("rescale_factor", cls.rescale_factor)),
                )
        return cls()


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    config: PreprocessConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Turn decoded RGB frames into the model's pixel input.

    Args:
        frames: (F, H, W, 3) uint8 RGB frames.
        config: resize target and normalisation.
        device: where to run (the uint8 frames are moved first, which is the cheapest transfer).
        dtype: dtype of the returned tensor.

    Returns:
        (F, 3, height, width) tensor: resized (bicubic, antialias, rounded to uint8 levels like the
        HF processor), rescaled and normalised.
    """
    pixels = torch.as_tensor(frames).to(device, non_blocking=True)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {tuple(pixels.shape)}")
    x = pixels.permute(0, 3, 1, 2)
    size = (config.height, config.width)
    if (x.shape[-2], x.shape[-1]) != size:
        if x.device.type == "cpu":
            # the HF processor on CPU resizes uint8 directly (torch's integer kernel): same here
            x = F.interpolate(x.contiguous(), size=size, mode="bicubic", antialias=True, align_corners=False)
        else:
            # on a GPU it resizes in float and rounds back to uint8 levels: same here
            x = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
    x = x.float()
    mean = to_device(torch.tensor(config.mean), x.device).view(1, 3, 1, 1)
    std = to_device(torch.tensor(config.std), x.device).view(1, 3, 1, 1)
    x = (x * config.rescale_factor - mean) / std
    return x.to(dtype)
