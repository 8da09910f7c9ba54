"""Shared test setup. Offline mode comes first: huggingface_hub reads these variables once, at import."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight LLaVA-OneVision checkpoint (seed 0, 4 decoder layers), built once per session.

    Treat it as read-only: every test of the session shares it.
    """
    from dycoke.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llava-ov") / "checkpoint")
