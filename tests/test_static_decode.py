"""The static-cache decode loop (the CUDA-graph path without the graph) generates exactly what
transformers' ``generate`` does: every method, batches with left padding, shared prefixes, end
tokens and forced lengths."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.decoding.fused import FusedStep
from dycoke.decoding.static import StaticGreedyDecoder, prefill_mask
from dycoke.errors import ConfigError
from dycoke.pipeline import PreparedVideo, VideoQA
from tests.test_dp_exact import make_batch
from tests.videos import textured_frames, write_video

QUESTIONS = ["What moves in the video?", "Why is the sky that colour, and what else can you see?", "Who?"]


@pytest.fixture(scope="module")
def qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def prepared(qa: VideoQA, tmp_path_factory: pytest.TempPathFactory) -> PreparedVideo:
    clip = write_video(tmp_path_factory.mktemp("sd") / "c.mp4", textured_frames(16, 96, 128, seed=11), fps=8)
    return qa.prepare(clip, VideoOptions(num_frames=8), with_signals=True)


def run(method: str, decoder: str, **kwargs: Any) -> RunOptions:
    return RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=8, min_new_tokens=8, decoder=decoder),
        method=MethodOptions(method=method, **kwargs),  # type: ignore[arg-type]
    )


def test_prefill_mask_is_causal_and_hides_padding_and_empty_slots() -> None:
    mask = prefill_mask(torch.tensor([[0, 1, 1]]), 5)[0, 0]
    assert mask.int().tolist() == [[0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("full", {}),
        ("dycoke", {"prune_layer": 2}),
        ("dycoke", {"prune_layer": 1, "gate_mode": "reuse", "gate_threshold": 0.99}),
        ("random", {}),
        ("uniform", {}),
        ("prumerge", {"prumerge_plus": True}),
        ("fastv", {}),
        ("fastv", {"fastv_layer": 1, "fastv_keep": 0.2}),
        ("dycoke", {"prune_layer": 2, "dp_evict": True}),
        ("dycoke", {"prune_layer": 1, "dp_evict": True, "gate_threshold": 0.99}),
    ],
)
@pytest.mark.parametrize("fused", [True, False])
def test_static_decoder_equals_generate(
    qa: VideoQA,
    prepared: PreparedVideo,
    method: str,
    kwargs: dict[str, Any],
    fused: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = []
    real = FusedStep.logits
    monkeypatch.setattr(FusedStep, "logits", lambda self, *a: steps.append(1) or real(self, *a))
    for share, batch in [(False, 1), (True, 3), (False, 3)]:
        hf = qa.answer_many(prepared, QUESTIONS, run(method, "hf", **kwargs), share_prefix=share, batch_size=batch)
        static_run = run(method, "static", **kwargs)
        static_run = replace(static_run, generation=replace(static_run.generation, fused_step=fused))
        static = qa.answer_many(prepared, QUESTIONS, static_run, share_prefix=share, batch_size=batch)
        for a, b in zip(hf, static, strict=True):
            assert b.token_ids == a.token_ids, (method, share, batch)
            for figure in ("pruned_step_share", "evicted_wanted_back_avg_tokens", "visual_kept_late_layers"):
                assert b.compression.get(figure) == a.compression.get(figure), (method, figure)
            assert b.memory.kv_cache_bytes == a.memory.kv_cache_bytes
            assert (a.decoder, b.decoder) == ("hf", "static")
    assert bool(steps) is fused  # the fused step ran, or never


@pytest.mark.parametrize("eos,min_new", [([53], 0), ([53, 722], 0), ([53], 3), ([11], 0)])
def test_end_tokens_and_forced_lengths_as_generate(tiny_checkpoint: Path, eos: list[int], min_new: int) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    embeds, mask, _ = make_batch(model, [0, 4, 1])
    with torch.inference_mode():
        expected = model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=10,
            min_new_tokens=min_new or None,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        )
        decoder = StaticGreedyDecoder(
            model, max_new_tokens=10, min_new_tokens=min_new, eos_ids=eos, pad_id=0, use_graph=False
        )
        got = decoder.generate(embeds, mask)
    assert got.tolist() == expected.tolist()


def test_decoder_choices_are_checked(qa: VideoQA, prepared: PreparedVideo) -> None:
    with pytest.raises(ConfigError, match="decoder must be one of auto, hf, static, graph, got 'fast'"):
        GenerationOptions(decoder="fast")
    with pytest.raises(ConfigError, match="decoder 'static' decodes greedily"):
        GenerationOptions(decoder="static", do_sample=True)
    with pytest.raises(ConfigError, match="decoder 'graph' needs a CUDA device, the model is on cpu"):
        qa.answer(prepared, "What?", run("full", "graph"))


def test_streamed_tokens_are_the_returned_ones_and_stop_ends_soon(tiny_checkpoint: Path) -> None:
    """The host reads each step's tokens one step behind the GPU: what ``on_tokens`` receives is still
    exactly what ``generate`` returns, row by row, and ``stop()`` ends it within a step."""
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    embeds, mask, _ = make_batch(model, [0, 4, 1])
    seen: list[list[int]] = []

    def decode(stop: Any = None) -> torch.Tensor:
        seen.clear()
        decoder = StaticGreedyDecoder(
            model, max_new_tokens=10, min_new_tokens=10, eos_ids=[53], pad_id=0, use_graph=False
        )
        with torch.inference_mode():
            return decoder.generate(embeds, mask, on_tokens=lambda t: seen.append(t.tolist()), stop=stop)

    full = decode()
    assert full.shape == (3, 10) and full.T.tolist() == seen
    stopped = decode(stop=lambda: len(seen) >= 3)
    assert stopped.shape[1] in (3, 4) and stopped.T.tolist() == seen
    assert stopped.tolist() == full[:, : stopped.shape[1]].tolist()


def test_the_prefilled_dynamic_copy_is_freed_as_the_static_cache_fills(tiny_checkpoint: Path) -> None:
    """The prompt's keys and values are not held twice while decoding: the dynamic cache that prefill
    wrote (here one passed in as the prefix) is emptied layer by layer as the static cache takes it."""
    from transformers import DynamicCache, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    embeds, mask, _ = make_batch(model, [0, 4, 1])
    prefilled = DynamicCache(config=model.config)
    decoder = StaticGreedyDecoder(model, max_new_tokens=4, min_new_tokens=4, eos_ids=[53], pad_id=0, use_graph=False)
    with torch.inference_mode():
        got = decoder.generate(embeds, mask, prefix=prefilled)
        plain = StaticGreedyDecoder(
            model, max_new_tokens=4, min_new_tokens=4, eos_ids=[53], pad_id=0, use_graph=False
        ).generate(embeds, mask)
    assert got.tolist() == plain.tolist()
    assert len(prefilled.layers) == model.config.text_config.num_hidden_layers
    assert all(layer.keys.numel() == 0 and layer.values.numel() == 0 for layer in prefilled.layers)
    assert all(layer.keys.shape[2] == mask.shape[1] + 4 for layer in decoder.cache.layers)


class _RecordingGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on the CPU: each replay runs the captured step; counts
    captures and replays."""

    captures = 0
    replays = 0

    def __init__(self) -> None:
        self.step: Any = None

    def replay(self) -> None:
        type(self).replays += 1
        self.step()


@pytest.mark.parametrize("eager_first_step", [True, False])
def test_the_graph_is_captured_at_the_first_step_unless_the_method_compacts_after_it(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, eager_first_step: bool
) -> None:
    """Without a method that compacts after the first step, that step is captured and replayed (no eager
    step); with one (``--dp-evict``), it runs eagerly and the second is captured. Same tokens either way.
    The capture starts once the kernels' compile thread has ended (its GPU work would invalidate it)."""
    import threading
    import time
    from contextlib import contextmanager

    from transformers import LlavaOnevisionForConditionalGeneration

    from dycoke.decoding import kernels, static

    compiled = threading.Event()
    compiling = threading.Thread(target=lambda: (time.sleep(0.3), compiled.set()))
    compiling.start()
    monkeypatch.setattr(kernels, "_WARMING", [compiling])

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    embeds, mask, _ = make_batch(model, [0, 2])
    eager_steps: list[int] = []
    capturing_now = [False]
    forward = StaticGreedyDecoder._forward_step

    def counted(self: StaticGreedyDecoder) -> None:
        if capturing_now[0]:  # a capture records the step's kernels; it does not run them
            return
        eager_steps.append(1)
        forward(self)

    @contextmanager
    def capturing(graph: _RecordingGraph) -> Any:
        assert compiled.is_set()
        _RecordingGraph.captures += 1
        capturing_now[0] = True
        try:
            yield
        finally:
            capturing_now[0] = False
        graph.step = lambda: forward(decoder)

    _RecordingGraph.captures = _RecordingGraph.replays = 0
    monkeypatch.setattr(static.torch.cuda, "CUDAGraph", _RecordingGraph)
    monkeypatch.setattr(static.torch.cuda, "graph", capturing)
    monkeypatch.setattr(StaticGreedyDecoder, "_forward_step", counted)
    with torch.inference_mode():
        decoder = StaticGreedyDecoder(
            model, max_new_tokens=6, min_new_tokens=6, eos_ids=[0], pad_id=0, use_graph=True,
            eager_first_step=eager_first_step,
        )  # fmt: skip
        got = decoder.generate(embeds, mask)
        plain = StaticGreedyDecoder(model, max_new_tokens=6, min_new_tokens=6, eos_ids=[0], pad_id=0, use_graph=False)
        monkeypatch.setattr(StaticGreedyDecoder, "_forward_step", forward)
        expected = plain.generate(embeds, mask)
    assert got.tolist() == expected.tolist()
    assert _RecordingGraph.captures == 1
    # steps 1-5 (the prompt's logits chose token 0): the first eager or replayed, the rest replayed
    assert len(eager_steps) == (1 if eager_first_step else 0)
    assert _RecordingGraph.replays == (4 if eager_first_step else 5)


def test_only_eviction_compacts_after_the_first_decode_step(qa: VideoQA) -> None:
    from dycoke.methods.base import build_method

    model, layers = qa.loaded.model, qa.loaded.num_layers
    for method, kwargs, expected in [
        ("full", {}, False),
        ("dycoke", {}, False),
        ("dycoke", {"dp_evict": True}, True),
        ("fastv", {}, False),
        ("random", {}, False),
    ]:
        built = build_method(MethodOptions(method=method, **kwargs), model, layers)  # type: ignore[arg-type]
        assert built.compacts_in_decode is expected, (method, kwargs)
