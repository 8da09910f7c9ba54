"""CUDA checks, run on the GPU machine (skipped without a GPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.pipeline import VideoQA
from tests.test_dp_exact import make_batch, naive_generate
from tests.videos import textured_frames, write_video

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("gpu") / "clip.mp4", textured_frames(24, 96, 128, seed=5), fps=12)


@pytest.fixture(scope="module")
def qa32(tiny_checkpoint: Path) -> VideoQA:
    """The tiny model on the GPU in float32 without TF32: what exactness checks compare."""
    torch.backends.cuda.matmul.allow_tf32 = False
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda", dtype="float32"))


def _eight_frames(tokens: int, decoder: str = "auto", **method: Any) -> RunOptions:
    """8 frames, exactly ``tokens`` answer tokens on ``decoder``, ``MethodOptions(**method)``."""
    return RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, decoder=decoder),
        method=MethodOptions(**method),
    )


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_pipeline_runs_on_cuda_in_bf16(tiny_checkpoint: Path, clip: Path, method: str) -> None:
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda"))
    assert qa.loaded.dtype == torch.bfloat16
    run = RunOptions(
        video=VideoOptions(num_frames=16),
        generation=GenerationOptions(max_new_tokens=12, min_new_tokens=12),
        method=MethodOptions(method=method, prune_layer=2),  # type: ignore[arg-type]
    )
    report = qa.ask(clip, "What moves?", run)
    assert report.tokens.generated == 12
    assert report.memory.peak_gpu_bytes is not None and report.memory.peak_gpu_bytes > 0
    assert report.tokens.visual == (1619 if method == "dycoke" else 16 * 196 + 1)


def test_dp_on_cuda_matches_the_naive_reference(tiny_checkpoint: Path) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    from dycoke.methods.dycoke import DyCoke

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_model: Any = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    cuda_model: Any = LlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="sdpa"
    ).to("cuda")
    embeds, mask, starts = make_batch(cpu_model.eval(), [0, 5])
    expected, _ = naive_generate(
        cpu_model, embeds, mask, starts, prune=True, layer_l=2, ratio_p=0.7, threshold=1.0, mode="official"
    )
    method = DyCoke(MethodOptions(method="dycoke", prune_layer=2, gate_threshold=1.0), cuda_model.eval())
    with torch.inference_mode(), method.decoding(visual_start=starts.cuda(), num_visual=60):
        out = cuda_model.generate(
            inputs_embeds=embeds.detach().cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.tolist() == expected


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_shared_prefix_and_batches_on_cuda_answer_as_one_by_one(qa32: VideoQA, clip: Path, method: str) -> None:
    qa = qa32
    run = _eight_frames(8, method=method, prune_layer=2)
    prepared = qa.prepare(clip, run.video)
    questions = ["What moves?", "Describe the background in detail, please.", "Why?"]
    alone = [qa.answer(prepared, q, run).token_ids for q in questions]
    shared = qa.answer_many(prepared, questions, run, batch_size=3)
    assert [r.token_ids for r in shared] == alone
    assert all(r.timings_s.shared_prefix > 0 for r in shared)


@pytest.mark.parametrize("method", ["fastv", "prumerge", "random", "uniform"])
def test_baselines_on_cuda_in_bf16_batched(tiny_checkpoint: Path, clip: Path, method: str) -> None:
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda"))
    run = _eight_frames(6, method=method)
    prepared = qa.prepare(clip, run.video, with_signals=method == "prumerge")
    reports = qa.answer_many(prepared, ["What moves?", "Describe the scene in detail."], run, batch_size=2)
    assert [r.tokens.generated for r in reports] == [6, 6]
    assert reports[0].tokens.visual == reports[1].tokens.visual < 8 * 196 + 1 or method == "fastv"


def test_fastv_keeping_everything_on_cuda_is_full(qa32: VideoQA, clip: Path) -> None:
    prepared = qa32.prepare(clip, VideoOptions(num_frames=8))
    full = qa32.answer(prepared, "What moves?", _eight_frames(8, method="full"))
    fastv = qa32.answer(prepared, "What moves?", _eight_frames(8, method="fastv", fastv_keep=1.0))
    assert fastv.token_ids == full.token_ids


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_cuda_graph_decoder_generates_what_generate_does(qa32: VideoQA, clip: Path, method: str) -> None:
    def run(decoder: str) -> RunOptions:
        return _eight_frames(12, decoder, method=method, prune_layer=2)

    prepared = qa32.prepare(clip, VideoOptions(num_frames=8))
    questions = ["What moves?", "Describe the scene in detail, please.", "Why?"]
    for batch in (1, 3):
        hf = qa32.answer_many(prepared, questions, run("hf"), batch_size=batch)
        graph = qa32.answer_many(prepared, questions, run("graph"), batch_size=batch)
        assert [r.token_ids for r in graph] == [r.token_ids for r in hf]
        assert [r.compression.get("pruned_step_share") for r in graph] == [
            r.compression.get("pruned_step_share") for r in hf
        ]


def test_recording_inside_the_cuda_graph_matches_generate(qa32: VideoQA, clip: Path) -> None:
    def run(decoder: str) -> RunOptions:
        return _eight_frames(10, decoder, method="dycoke", prune_layer=2, gate_threshold=0.999)

    prepared = qa32.prepare(clip, VideoOptions(num_frames=8))
    hf = qa32.answer(prepared, "What moves?", run("hf"), record=True)
    graph = qa32.answer(prepared, "What moves?", run("graph"), record=True)
    assert graph.token_ids == hf.token_ids
    assert hf.trace is not None and graph.trace is not None
    assert graph.trace.step_kept == hf.trace.step_kept and len(graph.trace.step_kept) == 9
    np.testing.assert_allclose(graph.trace.step_attention, hf.trace.step_attention, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "dycoke"])
def test_a_model_split_over_gpu_and_cpu_memory_answers_as_on_one_device(
    tiny_checkpoint: Path, qa32: VideoQA, clip: Path, method: str
) -> None:
    """``--device-map auto`` with a GPU cap too small for the model (a 72B on one GPU): accelerate puts
    the rest in CPU memory; DP's keep sets follow; the answer equals the single-device one."""
    one = qa32
    # every step prunes: no gate decision can flip on rounding
    run = _eight_frames(10, method=method, prune_layer=2, gate_threshold=1.0)
    prepared = one.prepare(clip, VideoOptions(num_frames=8))
    expected = one.answer(prepared, "What moves?", run)
    size = sum(p.numel() * p.element_size() for p in one.loaded.model.parameters())
    cap = f"{size // 2 // 1024}KiB"
    split = VideoQA.load(
        ModelOptions(model=str(tiny_checkpoint), device_map="auto", dtype="float32", max_gpu_memory=cap)
    )
    placed = set(split.loaded.model.hf_device_map.values())
    assert "cpu" in placed and len(placed) > 1, placed
    assert not split.loaded.single_device
    got = split.answer(split.prepare(clip, VideoOptions(num_frames=8)), "What moves?", run)
    assert got.token_ids == expected.token_ids
    assert got.compression.get("pruned_step_share") == expected.compression.get("pruned_step_share")


@pytest.mark.parametrize(
    "method,kwargs",
    [("fastv", {}), ("dycoke", {"dp_evict": True}), ("dycoke", {"dp_evict": True, "gate_threshold": 0.999})],
)
def test_fastv_and_eviction_decode_on_the_cuda_graph_as_generate(
    qa32: VideoQA, clip: Path, method: str, kwargs: dict[str, Any]
) -> None:
    def run(decoder: str) -> RunOptions:
        return _eight_frames(12, decoder, method=method, prune_layer=2, **kwargs)

    prepared = qa32.prepare(clip, VideoOptions(num_frames=8))
    questions = ["What moves?", "Describe the scene in detail, please.", "Why?"]
    for batch in (1, 3):
        hf = qa32.answer_many(prepared, questions, run("hf"), batch_size=batch)
        graph = qa32.answer_many(prepared, questions, run("auto"), batch_size=batch)
        assert [r.token_ids for r in graph] == [r.token_ids for r in hf]
        assert [r.memory.kv_cache_bytes for r in graph] == [r.memory.kv_cache_bytes for r in hf]
        assert {r.decoder for r in graph} == {"graph"} and {r.decoder for r in hf} == {"hf"}


@pytest.mark.parametrize("kwargs", [{}, {"gate_threshold": 0.999}])
def test_eviction_in_row_groups_on_the_cuda_graph_as_generate(
    qa32: VideoQA, clip: Path, kwargs: dict[str, Any]
) -> None:
    """The batch prefilled two rows at a time (``prefill_rows``), its graph captured on the gathered cache."""

    def run(decoder: str, rows: int) -> RunOptions:
        options = _eight_frames(12, decoder, method="dycoke", prune_layer=2, dp_evict=True, **kwargs)
        return replace(options, generation=replace(options.generation, prefill_rows=rows))

    prepared = qa32.prepare(clip, VideoOptions(num_frames=8))
    questions = ["What moves?", "Describe the scene in detail, please.", "Why?", "Where is it?", "Who is there?"]
    hf = qa32.answer_many(prepared, questions, run("hf", 0), batch_size=5)
    for rows in (0, 2):
        graph = qa32.answer_many(prepared, questions, run("auto", rows), batch_size=5)
        assert [r.token_ids for r in graph] == [r.token_ids for r in hf], rows
        assert [r.memory.kv_cache_bytes for r in graph] == [r.memory.kv_cache_bytes for r in hf]
        for figure in ("pruned_step_share", "evicted_wanted_back_avg_tokens"):
            assert [r.compression[figure] for r in graph] == [r.compression[figure] for r in hf], figure
        assert {r.decoder for r in graph} == {"graph"}


def test_encoder_matches_get_video_features_in_bf16(tiny_checkpoint: Path) -> None:
    """Channels-last tower input and pooling change memory layouts, not the arithmetic: the pooling is
    bit-equal; the tower may take another convolution algorithm for the other layout (on the 7B shape
    the whole encoder measured bit-equal: benchmarks/profile_vision.py), so bf16 closeness there."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from dycoke.vision import encode_frames, pool_frame_grid
    from tests.test_vision import transformers_tokens

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).cuda()
    grid = torch.randn(8, 729, 3584, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(pool_frame_grid(grid, 27), model.model.apply_pooling(grid))
    pixels = torch.rand(8, 3, 384, 384, device="cuda", dtype=torch.bfloat16) * 2 - 1
    with torch.inference_mode():
        tokens, _, _ = encode_frames(model, pixels, 196)
        reference = transformers_tokens(model, pixels)
    scale = float(reference.float().abs().max())
    torch.testing.assert_close(tokens.float(), reference.float(), rtol=0, atol=2**-7 * scale)


def test_weights_read_ahead_onto_the_gpu_give_the_plain_model(tiny_checkpoint: Path) -> None:
    from dycoke.model import load_model
    from dycoke.weights import prefetch_weights

    options = ModelOptions(model=str(tiny_checkpoint), device="cuda")
    prefetch = prefetch_weights(options)
    assert prefetch is not None  # a local checkpoint, one GPU with room: read ahead
    built, plain = load_model(options, prefetch), load_model(options)
    ours, theirs = built.model.state_dict(), plain.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].device == theirs[k].device for k in ours)


def test_the_model_takes_tensors_read_onto_the_gpu_without_a_copy(tiny_checkpoint: Path) -> None:
    """On the GPU in bf16, as the read-ahead builds: every parameter is a tensor it read (no second copy
    on the device; the read-ahead's room-for-two rule is then more than needed)."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    from dycoke.weights import checkpoint_files, read_safetensors

    device = torch.device("cuda", torch.cuda.current_device())
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(tiny_checkpoint):
        tensors.update(read_safetensors(file, device, torch.bfloat16))
    storage = {t.data_ptr() for t in tensors.values()}
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        None,
        config=AutoConfig.from_pretrained(tiny_checkpoint),
        state_dict=dict(tensors),
        dtype=torch.bfloat16,
        device_map={"": device},
    )
    params = model.state_dict()
    assert params and all(p.data_ptr() in storage for p in params.values())


def test_the_gpu_library_warm_up_runs_once_per_device_and_dtype() -> None:
    from dycoke import warmup

    device = torch.device("cuda", torch.cuda.current_device())
    warmup.warm_gpu_libraries(device, torch.bfloat16)  # raises here if an op or layout is wrong
    first = warmup.start_warming(device, torch.float16)
    assert first is not None and warmup.start_warming(device, torch.float16) is first
    first.join(timeout=60)
    assert not first.is_alive()


def test_a_shallow_model_answers_on_the_gpu_while_the_model_loads(
    tiny_checkpoint: Path, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm answer runs on the GPU (called directly, it raises on any error), a load starts it, the
    first answer waits for it, and the answers are those of a load without it."""
    from transformers import AutoConfig

    from dycoke import warm_answer
    from dycoke.model import tokenizer_of
    from dycoke.preprocess import PreprocessConfig

    device = torch.device("cuda", torch.cuda.current_device())
    config = warm_answer.shallow_config(AutoConfig.from_pretrained(tiny_checkpoint), 4)
    warm_answer.answer_once(
        warm_answer.build_shallow_model(config, device, torch.bfloat16),
        device=device,
        dtype=torch.bfloat16,
        tokenizer=tokenizer_of(str(tiny_checkpoint)),
        preprocess=PreprocessConfig.from_pretrained_dir(tiny_checkpoint),
        source=str(tiny_checkpoint),
    )
    started: list[Any] = []
    start = warm_answer.start_warm_answer
    monkeypatch.setattr(warm_answer, "start_warm_answer", lambda *a, **k: started.append(start(*a, **k)) or started[-1])
    run = _eight_frames(8, method="dycoke", prune_layer=2)
    warmed = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda")).ask(clip, "What moves?", run)
    assert len(started) == 1 and started[0] is not None and not started[0].thread.is_alive()
    monkeypatch.setenv(warm_answer.WARM_ANSWER_ENV, "0")
    plain = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda")).ask(clip, "What moves?", run)
    assert warmed.answer == plain.answer and warmed.tokens == plain.tokens
