"""The public Python API as the README shows it: lazy exports, a model id string, options by keyword."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.videos import textured_frames, write_video


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("api") / "clip.mp4", textured_frames(20, 96, 128, seed=3), fps=10)


def test_import_dycoke_imports_no_torch() -> None:
    code = "import sys, dycoke; assert 'torch' not in sys.modules, 'torch'; print(sorted(dycoke.__all__)[:3])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_the_readme_example_runs(tiny_checkpoint: Path, clip: Path) -> None:
    from dycoke import Report, VideoQA, read_video

    qa = VideoQA.load(str(tiny_checkpoint), device="cpu", dtype="float32")
    r = qa.ask(str(clip), "What is stationary?", method="dycoke", merge_ratio=0.7, max_new_tokens=8, num_frames=8)
    assert isinstance(r, Report)
    assert r.method == "dycoke" and r.options["method"]["merge_ratio"] == 0.7
    assert r.tokens.frames == 8 and r.tokens.visual < r.tokens.visual_uncompressed
    assert 1 <= r.tokens.generated <= 8 and r.timings_s.total > 0
    full = qa.ask(str(clip), "What is stationary?", method="full", max_new_tokens=4, min_new_tokens=4, num_frames=8)
    assert full.tokens.visual == 8 * 196 + 1 and full.tokens.generated == 4
    video = read_video(str(clip), num_frames=8)
    assert video.frames.shape[0] == 8 and len(video.indices) == len(video.timestamps_s) == 8


def test_unknown_and_impossible_keyword_options_are_clear_errors(tiny_checkpoint: Path, clip: Path) -> None:
    from dycoke import ConfigError, VideoQA

    qa = VideoQA.load(str(tiny_checkpoint), device="cpu")
    with pytest.raises(ConfigError, match=r"unknown option 'merge_ration'; options are: .*merge_ratio"):
        qa.ask(str(clip), "What?", merge_ration=0.5)
    with pytest.raises(ConfigError, match=r"merge-ratio \(K\) must be in \[0.0, 1.0\), got 1.5"):
        qa.ask(str(clip), "What?", merge_ratio=1.5)
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        VideoQA.load(str(tiny_checkpoint), device="gpu")


def test_an_unknown_method_name_is_an_error_not_a_fallback(tiny_checkpoint: Path) -> None:
    from dycoke import ConfigError, MethodOptions, VideoQA
    from dycoke.config import METHODS
    from dycoke.methods import build_method, registered_methods

    assert registered_methods() == list(METHODS)
    qa = VideoQA.load(str(tiny_checkpoint), device="cpu")
    options = MethodOptions()
    object.__setattr__(options, "method", "fastvv")  # past the dataclass's own check, as a stale caller could
    with pytest.raises(ConfigError, match="method must be one of full, dycoke, fastv, prumerge, random, uniform"):
        build_method(options, qa.loaded.model, qa.loaded.num_layers)


def test_inputs_go_to_the_first_gpu_of_a_device_map_even_when_the_embedding_is_offloaded() -> None:
    from types import SimpleNamespace

    import torch

    from dycoke.model import execution_device

    spread = SimpleNamespace(
        hf_device_map={"model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": 1, "lm_head": 0}
    )
    cpu_only = SimpleNamespace(hf_device_map={"": "cpu"})

    class Plain(torch.nn.Module):
        def get_input_embeddings(self) -> torch.nn.Module:
            return torch.nn.Embedding(3, 2)

    assert execution_device(spread) == torch.device("cuda", 0)
    assert execution_device(cpu_only) == torch.device("cpu")
    assert execution_device(Plain()) == torch.device("cpu")  # no map: where the embedding is


def test_every_option_a_request_may_set_is_a_run_option_of_its_json_kind() -> None:
    from dataclasses import asdict

    from dycoke.config import RunOptions, request_fields, run_options

    defaults = {k: v for group in asdict(RunOptions()).values() for k, v in group.items()}
    fields = request_fields()
    assert {"num_frames", "seek", "method", "merge_ratio", "dp_evict", "min_new_tokens", "decoder"} <= set(fields)
    assert "similarity_fp32" not in fields and "max_new_tokens" not in fields  # renamed / OpenAI's own
    assert fields["fps"] == "float?" and fields["budget_tokens"] == "int?" and fields["gate_mode"] == "str"
    run_options(RunOptions(), **{name: defaults[name] for name in fields})  # every one is accepted by name
