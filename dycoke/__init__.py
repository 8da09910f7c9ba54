"""dycoke: answer questions about videos with LLaVA-OneVision, compressed with DyCoke.

    from dycoke import VideoQA, read_video
    qa = VideoQA.load("llava-hf/llava-onevision-qwen2-7b-ov-hf")   # or a local dir; device=, dtype=
    r = qa.ask("clip.mp4", "What is stationary?", method="dycoke", merge_ratio=0.7, max_new_tokens=64)
    video = read_video("clip.mp4", num_frames=32)                   # frames, indices, timestamps

Importing this package is cheap: the names below that need torch are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dycoke.errors import (
    ConfigError,
    CsvError,
    DeviceError,
    DyCokeError,
    ModelLoadError,
    OutOfMemoryError,
    VideoError,
)

if TYPE_CHECKING:
    from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, PromptOptions, RunOptions, VideoOptions
    from dycoke.pipeline import PreparedVideo, VideoQA
    from dycoke.report import Report
    from dycoke.video import VideoFrames, read_video

__version__ = "0.1.0"

_LAZY = {
    "VideoQA": "dycoke.pipeline",
    "PreparedVideo": "dycoke.pipeline",
    "read_video": "dycoke.video",
    "VideoFrames": "dycoke.video",
    "Report": "dycoke.report",
    "ModelOptions": "dycoke.config",
    "RunOptions": "dycoke.config",
    "VideoOptions": "dycoke.config",
    "MethodOptions": "dycoke.config",
    "GenerationOptions": "dycoke.config",
    "PromptOptions": "dycoke.config",
}

__all__ = [
    "ConfigError",
    "CsvError",
    "DeviceError",
    "DyCokeError",
    "GenerationOptions",
    "MethodOptions",
    "ModelLoadError",
    "ModelOptions",
    "OutOfMemoryError",
    "PreparedVideo",
    "PromptOptions",
    "Report",
    "RunOptions",
    "VideoError",
    "VideoFrames",
    "VideoOptions",
    "VideoQA",
    "__version__",
    "read_video",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (``import dycoke`` stays free of torch)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dycoke' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
