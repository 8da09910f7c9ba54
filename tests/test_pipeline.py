"""The whole pipeline on the tiny random checkpoint, against transformers' own ``generate``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.compress.ttm import ttm_token_count
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.errors import ConfigError, DeviceError, ModelLoadError
from dycoke.pipeline import VideoQA
from dycoke.preprocess import preprocess_frames
from dycoke.prompt import paper_prompt
from dycoke.video import read_video
from tests.videos import textured_frames, write_video

QUESTION = "What moves in the video?"
FRAMES = 8
NEW = 10


@pytest.fixture(scope="module")
def qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = textured_frames(24, 96, 128, seed=5)
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, fps=12)


def options(method: str = "full", frames: int = FRAMES, **method_kwargs: Any) -> RunOptions:
    return RunOptions(
        video=VideoOptions(num_frames=frames),
        generation=GenerationOptions(max_new_tokens=NEW, min_new_tokens=NEW),
        method=MethodOptions(method=method, **method_kwargs),  # type: ignore[arg-type]
    )


def stock_generate(qa: VideoQA, clip: Path, frames: int = FRAMES) -> list[int]:
    """What a user gets from transformers directly: placeholder ids + pixel_values_videos + generate."""
    loaded = qa.loaded
    video = read_video(clip, num_frames=frames)
    pixels = preprocess_frames(video.frames, loaded.preprocess)
    text = paper_prompt(QUESTION, "You are a helpful assistant.")
    n_video = video.num_frames * 196 + 1
    text = text.replace("<video>", "<video>" * n_video)
    ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert int((ids == loaded.video_token_id).sum()) == n_video
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values_videos=pixels.unsqueeze(0),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def answer_ids(qa: VideoQA, report: Any) -> list[int]:
    return qa.loaded.tokenizer(report.answer, add_special_tokens=False).input_ids


def test_full_method_generates_exactly_what_transformers_generates(qa: VideoQA, clip: Path) -> None:
    streamed: list[str] = []
    report = qa.ask(clip, QUESTION, options("full"), on_text=streamed.append)
    expected = stock_generate(qa, clip)
    assert report.token_ids == expected
    assert "".join(streamed).strip() == report.answer
    assert report.tokens.visual == report.tokens.visual_uncompressed == FRAMES * 196 + 1
    assert report.tokens.generated == NEW


def test_dycoke_with_k0_p0_is_the_uncompressed_path(qa: VideoQA, clip: Path) -> None:
    full = qa.ask(clip, QUESTION, options("full"))
    off = qa.ask(clip, QUESTION, options("dycoke", merge_ratio=0.0, prune_ratio=0.0))
    assert off.token_ids == full.token_ids
    assert off.tokens.visual == full.tokens.visual


def test_dycoke_changes_counts_as_the_paper_says(qa: VideoQA, clip: Path) -> None:
    report = qa.ask(clip, QUESTION, options("dycoke", frames=16, prune_layer=2))
    assert report.tokens.visual == ttm_token_count(16, 196, 0.7) + 1 == 1619
    assert report.tokens.visual_uncompressed == 16 * 196 + 1
    assert report.tokens.visual_per_frame == [196, 58, 58, 58] * 3 + [196, 58, 196, 58]
    c = report.compression
    assert c["decode_steps"] == NEW - 1
    assert c["candidates"] == 1619 - 2 and c["kept_when_pruned"] == int((1619 - 2) * 0.3)
    assert c["paper_final_ratio"] == pytest.approx(0.1425)
    assert c["retained_prefill_ratio"] == pytest.approx(1618 / (16 * 196))
    assert c["tflops"] < c["tflops_full"]


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 7, 9])
def test_placeholder_run_always_matches_merged_features(qa: VideoQA, clip: Path, frames: int) -> None:
    report = qa.ask(clip, QUESTION, options("dycoke", frames=frames, prune_layer=2))
    assert report.tokens.frames == frames
    # at most 4 frames: kept whole (the reference's window step needs 5), with a warning
    merged = ttm_token_count(frames, 196, 0.7) if frames >= 5 else frames * 196
    assert report.tokens.visual == merged + 1
    assert any("needs at least 5 frames" in w for w in report.video.warnings) == (frames < 5)
    assert sum(report.tokens.visual_per_frame) == report.tokens.visual - 1


def test_report_json_shape(qa: VideoQA, clip: Path) -> None:
    data = qa.ask(clip, QUESTION, options("dycoke", prune_layer=2)).to_dict()
    for key in ("answer", "method", "memory", "tokens", "timings_s", "video", "compression"):
        assert key in data
    for key in ("frames", "visual", "visual_uncompressed", "prompt", "generated"):
        assert isinstance(data["tokens"][key], int)
    assert data["timings_s"]["total"] > 0
    assert data["memory"]["kv_cache_bytes"] > 0 and data["memory"]["peak_gpu_bytes"] is None
    assert data["random_weights"] is True


def test_prune_layer_must_be_below_the_model_depth(qa: VideoQA, clip: Path) -> None:
    with pytest.raises(ConfigError, match=r"prune-layer \(L\) must be below the model's 4 layers \(1..3\), got 4"):
        qa.ask(clip, QUESTION, options("dycoke", prune_layer=4))


def test_sampling_is_reproducible_with_a_seed(qa: VideoQA, clip: Path) -> None:
    run = RunOptions(
        video=VideoOptions(num_frames=4),
        generation=GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7),
    )
    assert qa.ask(clip, QUESTION, run).token_ids == qa.ask(clip, QUESTION, run).token_ids


def test_missing_model_directory() -> None:
    with pytest.raises(ModelLoadError, match=re.escape("model directory not found: ./nowhere/model")):
        VideoQA.load(ModelOptions(model="./nowhere/model", device="cpu"))


def test_directory_that_is_not_llava_onevision(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(
        ModelLoadError, match=re.escape("config.json has model_type 'bert' (expected 'llava_onevision')")
    ):
        VideoQA.load(ModelOptions(model=str(tmp_path), device="cpu"))


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape("is not a LLaVA-OneVision checkpoint: no config.json in it")):
        VideoQA.load(ModelOptions(model=str(tmp_path), device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_asked_for_without_a_gpu(tiny_checkpoint: Path) -> None:
    with pytest.raises(DeviceError, match="device 'cuda' asked for, but no CUDA GPU is available here"):
        VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda"))


def test_unreachable_hub_id_is_one_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="could not load model 'someone/no-such-model'"):
        VideoQA.load(ModelOptions(model="someone/no-such-model", device="cpu"))


def test_checkpoint_chat_template_prompt(qa: VideoQA, clip: Path) -> None:
    from dycoke.config import PromptOptions

    run = RunOptions(
        video=VideoOptions(num_frames=4),
        generation=GenerationOptions(max_new_tokens=4, min_new_tokens=4),
        prompt=PromptOptions(style="checkpoint"),
    )
    report = qa.ask(clip, QUESTION, run)
    paper = qa.ask(clip, QUESTION, RunOptions(video=VideoOptions(num_frames=4), generation=run.generation))
    assert report.tokens.generated == 4
    assert report.tokens.prompt != paper.tokens.prompt  # no system prompt in the checkpoint's template


def test_out_of_memory_becomes_one_clear_error() -> None:
    from dycoke.errors import OutOfMemoryError
    from dycoke.pipeline import _oom_guard

    expected = "out of GPU memory in generation with 32 frames; try fewer --frames"
    with pytest.raises(OutOfMemoryError, match=expected), _oom_guard("generation", 32):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_map_without_gpus(tiny_checkpoint: Path) -> None:
    with pytest.raises(DeviceError, match="--device-map auto spreads the model over GPUs"):
        VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device_map="auto"))


def test_tflops_count_only_the_steps_dp_pruned(qa: VideoQA, clip: Path) -> None:
    from dycoke.costs import dycoke_tflops
    from dycoke.figures import llm_shape

    prepared = qa.prepare(clip, VideoOptions(num_frames=FRAMES))
    shape = llm_shape(qa.loaded.text_config)
    for threshold, share in [(-1.0, 0.0), (1.0, 1.0)]:  # -1: every step is stable (official: none prunes)
        report = qa.answer(prepared, QUESTION, options("dycoke", prune_layer=2, gate_threshold=threshold))
        c = report.compression
        assert c["pruned_step_share"] == share and c["pruned_steps"] == share * c["decode_steps"]
        merged = report.tokens.visual - 1
        expected = dycoke_tflops(shape, merged, report.tokens.generated, 2, 0.7 if share else 0.0)
        assert c["tflops"] == pytest.approx(expected)


@pytest.mark.parametrize("method", ["full", "dycoke", "fastv"])
def test_memory_and_flops_saved_are_exact_from_the_shapes(qa: VideoQA, clip: Path, method: str) -> None:
    from dycoke.costs import prefill_flops
    from dycoke.figures import llm_shape
    from dycoke.report import kv_cache_bytes

    report = qa.answer(qa.prepare(clip, VideoOptions(num_frames=FRAMES)), QUESTION, options(method, prune_layer=2))
    c, t, text = report.compression, report.tokens, qa.loaded.text_config
    full_seq = t.prompt - t.visual + t.visual_uncompressed + t.generated - 1
    assert c["kv_bytes_full"] == kv_cache_bytes(text, full_seq, 4)  # float32 on the CPU
    assert c["kv_bytes_stored"] == report.memory.kv_cache_bytes
    assert c["kv_bytes_saved"] == c["kv_bytes_full"] - c["kv_bytes_stored"]
    assert c["kv_bytes_read_per_step_without_dp"] == c["kv_bytes_stored"]
    shape = llm_shape(text)
    assert c["prefill_tflops_full"] == pytest.approx(prefill_flops(shape, FRAMES * 196) / 1e12)
    if method == "full":
        assert c["kv_bytes_saved"] == 0 and c["prefill_tflops"] == pytest.approx(c["prefill_tflops_full"])
        assert c["kv_bytes_attended_per_step"] == c["kv_bytes_stored"]
    else:
        assert c["kv_bytes_saved"] > 0 and c["prefill_tflops"] < c["prefill_tflops_full"]
    if method == "dycoke":  # every step prunes on random weights: the late layers read less
        assert c["kv_bytes_attended_per_step"] < c["kv_bytes_stored"]
