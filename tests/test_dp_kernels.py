"""DyCoke's pruning on its Triton kernels (``dycoke/decoding/dp_kernels.py``): where they apply, and on a
GPU that they compute what the torch definition computes (``pytest -m gpu``). Their logic on the CPU, in
Triton's interpreter: ``tests/interpreted_kernels.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dycoke.compress.kv_prune import PruneState, head_mean_attention
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.decoding import dp_kernels, kernels
from dycoke.pipeline import VideoQA
from tests.videos import textured_frames, write_video

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_kernels_stay_off_where_they_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    query, key, bias = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 20, 16), torch.zeros(1, 1, 1, 20)
    state = PruneState(starts=torch.tensor([3]), num_candidates=10, keep=3)
    assert not dp_kernels.dp_kernels_apply(state, query, key, key, bias)  # the split attention cannot run here
    runs: list[tuple[torch.Tensor, ...]] = []
    monkeypatch.setattr(dp_kernels, "split_attention_applies", lambda *tensors: runs.append(tensors) or True)
    assert dp_kernels.dp_kernels_apply(state, query, key, key, bias)
    assert runs == [(query, key, key, bias)]  # asked of the layer's own tensors
    monkeypatch.setenv(dp_kernels.DP_KERNELS_ENV, "0")
    assert not dp_kernels.dp_kernels_apply(state, query, key, key, bias)
    monkeypatch.delenv(dp_kernels.DP_KERNELS_ENV)
    recorded = PruneState(starts=torch.tensor([3]), num_candidates=10, keep=3, record_attention=True)
    assert not dp_kernels.dp_kernels_apply(recorded, query, key, key, bias)
    too_many = PruneState(starts=torch.tensor([3]), num_candidates=dp_kernels.MAX_CANDIDATES + 1, keep=3, max_steps=1)
    assert not dp_kernels.dp_kernels_apply(too_many, query, key, key, bias)
    elsewhere = PruneState(starts=torch.tensor([3], device="meta"), num_candidates=10, keep=3, max_steps=1)
    assert not dp_kernels.dp_kernels_apply(elsewhere, query, key, key, bias)  # the state on another device


def static_dycoke(checkpoint: Path, folder: Path, gate_threshold: float) -> tuple[VideoQA, Any, RunOptions]:
    """The tiny model on the CPU, a prepared 8-frame clip, and DyCoke (L=2) on the static decoder, 8 tokens."""
    clip = write_video(folder / "clip.mp4", textured_frames(12, 96, 128, seed=3), fps=12)
    qa = VideoQA.load(ModelOptions(model=str(checkpoint), device="cpu"))
    run = RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(max_new_tokens=8, min_new_tokens=8, decoder="static"),
        method=MethodOptions(method="dycoke", prune_layer=2, gate_threshold=gate_threshold),
    )
    return qa, qa.prepare(clip, VideoOptions(num_frames=8)), run


def pruning_step_in_torch(calls: list[int]) -> Any:
    """``dp_kernels.pruning_step`` by its torch definition (for the CPU); each call's rows into ``calls``."""

    def step(
        state: PruneState,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
        list_slots: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        calls.append(query.shape[0])
        out = kernels.split_attention_torch(query, key, value, bias, scale)
        state.update(state.visual_attention(head_mean_attention(query, key, scale, bias)))
        later = state.later_bias(bias)
        return out, later, kernels.attended_slots(later) if list_slots else None

    return step


def test_the_static_decoder_takes_the_kernels_path_and_answers_the_same(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU, the attention function's kernel path (layer L-1 makes the later layers' bias, which they
    then attend through) with ``pruning_step`` stood in for by its torch definition: the same tokens and
    pruned steps as the torch path, in batches too."""
    from dycoke.methods import dycoke as method

    calls: list[int] = []
    torch_pruning_step = pruning_step_in_torch(calls)

    qa, prepared, run = static_dycoke(tiny_checkpoint, tmp_path, gate_threshold=0.999)
    questions = ["What moves?", "Describe the scene in detail, please."]
    expected = qa.answer_many(prepared, questions, run, batch_size=2)
    monkeypatch.setattr(method, "pruning_step", torch_pruning_step)
    monkeypatch.setattr(method, "dp_kernels_apply", lambda *args: True)
    got = qa.answer_many(prepared, questions, run, batch_size=2)
    assert calls and set(calls) == {2}
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    shares = [r.compression["pruned_step_share"] for r in got]
    assert shares == [r.compression["pruned_step_share"] for r in expected] and min(shares) > 0


def test_attended_slots_list_the_slots_a_bias_lets_through() -> None:
    bias = torch.zeros(3, 1, 1, 7)
    bias[0, ..., [1, 4]] = float("-inf")
    bias[1, ..., :6] = float("-inf")
    index, counts = kernels.attended_slots(bias)
    assert counts.tolist() == [5, 1, 7] and index.dtype == counts.dtype == torch.int32
    assert [index[row, : int(n)].tolist() for row, n in enumerate(counts)] == [[0, 2, 3, 5, 6], [6], list(range(7))]
    query, key, value = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    expected = kernels.split_attention_torch(query, key, value, bias, 0.3)
    assert torch.allclose(kernels.gathered_attention_torch(query, key, value, index, counts, 0.3), expected)


def test_gathering_is_for_batches_unless_switched(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dp_kernels.gather_later_layers(1) and dp_kernels.gather_later_layers(2)
    monkeypatch.setenv(dp_kernels.DP_GATHER_ENV, "1")
    assert dp_kernels.gather_later_layers(1)
    monkeypatch.setenv(dp_kernels.DP_GATHER_ENV, "0")
    assert not dp_kernels.gather_later_layers(8)


def test_later_layers_attend_through_the_gathered_slots(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU, with the kernels stood in for by their torch definitions: layers >= L take the slots the
    step's bias lists (``gathered_attention``) and answer as the masked path; ``DYCOKE_DP_GATHER=0`` keeps
    the masked path."""
    from dycoke.methods import dycoke as method

    torch_pruning_step = pruning_step_in_torch([])

    gathered: list[int] = []

    def torch_gathered(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attended: tuple[torch.Tensor, ...],
        scale: float,
        **_: object,
    ) -> torch.Tensor:
        index, counts = attended
        gathered.append(int(counts.min()))
        assert int(counts.max()) < key.shape[2]  # a pruned step lists fewer slots than the cache holds
        return kernels.gathered_attention_torch(query, key, value, index, counts, scale)

    qa, prepared, run = static_dycoke(tiny_checkpoint, tmp_path, gate_threshold=1.0)  # every step prunes
    questions = ["What moves?", "Describe the scene in detail, please."]
    expected = qa.answer_many(prepared, questions, run, batch_size=2)
    monkeypatch.setattr(method, "pruning_step", torch_pruning_step)
    monkeypatch.setattr(method, "dp_kernels_apply", lambda *args: True)
    monkeypatch.setattr(method, "split_attention_applies", lambda *args: True)
    monkeypatch.setattr(method, "gathered_attention", torch_gathered)
    got = qa.answer_many(prepared, questions, run, batch_size=2)
    layers_after = qa.loaded.num_layers - 2
    assert len(gathered) == layers_after * 7  # every later layer of every decode step
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    gathered.clear()
    alone = qa.answer_many(prepared, questions, run, batch_size=1)
    assert not gathered and [r.token_ids for r in alone] == [r.token_ids for r in expected]  # one row: masked
    monkeypatch.setenv(dp_kernels.DP_GATHER_ENV, "1")
    assert [r.token_ids for r in qa.answer_many(prepared, questions, run, batch_size=1)] == [
        r.token_ids for r in expected
    ]
    assert len(gathered) == 2 * layers_after * 7
    gathered.clear()
    monkeypatch.setenv(dp_kernels.DP_GATHER_ENV, "0")
    masked = qa.answer_many(prepared, questions, run, batch_size=2)
    assert not gathered and [r.token_ids for r in masked] == [r.token_ids for r in expected]


def _cache(b: int, hq: int, hkv: int, d: int, length: int, written: int) -> tuple[torch.Tensor, ...]:
    """bf16 query, keys, values on the GPU and an additive bias hiding the slots from ``written`` on."""
    torch.manual_seed(length + b)
    query = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    bias = torch.zeros(b, 1, 1, length, device="cuda", dtype=torch.bfloat16)
    bias[..., written:] = float("-inf")
    return query, key, value, bias


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("b", "length", "n"), [(1, 3300, 3100), (2, 12400, 12000), (1, 40000, 39000)])
def test_pruning_step_is_the_torch_definition(b: int, length: int, n: int) -> None:
    """7B's heads in bf16: the layer's attention as ``split_attention`` alone, the head-mean probabilities on
    the candidates within float32 rounding of ``head_mean_attention``, and, given those probabilities,
    the gate, the keep set, the state's buffers and the later layers' bias exactly ``PruneState``'s."""
    query, key, value, bias = _cache(b, 28, 4, 128, length, written=length - 50)
    starts = torch.arange(b, device="cuda") * 7 + 60
    for mode in ("official", "reuse"):
        ours = PruneState(starts=starts, num_candidates=n, keep=int(n * 0.3), mode=mode, max_steps=8)  # type: ignore[arg-type]
        reference = PruneState(starts=starts, num_candidates=n, keep=int(n * 0.3), mode=mode, max_steps=8)  # type: ignore[arg-type]
        for step in range(4):
            q = query if step != 2 else query + 0.01 * torch.randn_like(query)  # step 2 close to step 1: no pruning
            # step 3: another, sharper query: the mean of 28 heads' attention at random weights hardly moves
            # (cosine about 0.94 for two random queries of this scale), a sharper one does
            q = q if step != 3 else 6 * torch.randn_like(query)
            out, later, listed = dp_kernels.pruning_step(ours, q, key, value, bias, 128**-0.5, list_slots=True)
            assert torch.equal(out, kernels.split_attention(q, key, value, bias, 128**-0.5))
            assert listed is not None
            index, counts = kernels.attended_slots(later)
            assert torch.equal(listed[1], counts)
            assert all(torch.equal(listed[0][r, : int(c)], index[r, : int(c)]) for r, c in enumerate(counts))
            expected = head_mean_attention(q, key, 128**-0.5, bias).gather(1, reference.span)
            error = float((ours.previous - expected).abs().max())
            assert torch.allclose(ours.previous, expected, rtol=1e-4, atol=1e-9), error
            kept = reference.update(ours.previous.clone())
            assert torch.equal(ours.kept, kept) and torch.equal(ours.history, reference.history), (mode, step)
            assert int(ours.step) == step + 1
            assert torch.equal(later, reference.later_bias(bias)), (mode, step)
        assert ours.pruned_steps().tolist() == reference.pruned_steps().tolist()
        if mode == "official":  # both kinds of step ran ("reuse" counts a kept old selection as pruned)
            assert ours.pruned_steps().tolist() == [2] * b


@pytest.mark.gpu
@needs_gpu
def test_pruning_step_replays_in_a_cuda_graph() -> None:
    query, key, value, bias = _cache(1, 28, 4, 128, 5000, written=4990)
    starts = torch.tensor([40], device="cuda")
    graphed = PruneState(starts=starts, num_candidates=4000, keep=1200, max_steps=8)
    eager = PruneState(starts=starts, num_candidates=4000, keep=1200, max_steps=8)
    q = query.clone()
    dp_kernels.pruning_step(graphed, q, key, value, bias, 128**-0.5, list_slots=True)  # compiled outside the capture
    graphed.step.zero_()
    graphed.previous.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, later, listed = dp_kernels.pruning_step(graphed, q, key, value, bias, 128**-0.5, list_slots=True)
    assert listed is not None
    for step in range(3):
        q.copy_(torch.randn_like(query))
        graph.replay()
        out_eager, later_eager, _ = dp_kernels.pruning_step(eager, q, key, value, bias, 128**-0.5)
        assert torch.equal(out, out_eager) and torch.equal(later, later_eager), step
        assert torch.equal(listed[1], kernels.attended_slots(later)[1]), step
        assert torch.equal(graphed.kept, eager.kept) and int(graphed.step) == int(eager.step) == step + 1


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("b", "length"), [(1, 3300), (8, 3300), (72, 3300), (2, 25000)])
def test_gathered_attention_is_the_masked_attention(b: int, length: int) -> None:
    """7B's heads in bf16, a DP-like bias (padding, a third of the candidates, the empty slots): the
    gathered kernel within float32 summation order of ``split_attention`` (both round once to bf16), also
    replayed in a CUDA graph on new keys."""
    query, key, value, bias = _cache(b, 28, 4, 128, length, written=length - 40)
    pruned = torch.rand(b, length, device="cuda") < 0.65
    pruned[:, : length // 20] = False
    bias.masked_fill_(pruned.view(b, 1, 1, length), float("-inf"))
    attended = kernels.attended_slots(bias)
    expected = kernels.split_attention(query, key, value, bias, 128**-0.5)
    got = kernels.gathered_attention(query, key, value, attended, 128**-0.5)
    reference = kernels.split_attention_torch(query, key, value, bias, 128**-0.5).float()
    for out in (got, expected):
        assert (out.float() - reference).abs().max() <= 2**-7 * reference.abs().max()
    assert torch.allclose(got.float(), expected.float(), rtol=2**-7, atol=1e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = kernels.gathered_attention(query, key, value, kernels.attended_slots(bias), 128**-0.5)
    key.copy_(torch.randn_like(key))
    graph.replay()
    assert torch.equal(replayed, kernels.gathered_attention(query, key, value, attended, 128**-0.5))


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("dp") / "clip.mp4", textured_frames(24, 96, 128, seed=5), fps=12)


@pytest.mark.gpu
@needs_gpu
def test_dycoke_on_the_graph_decoder_answers_as_with_torchs_pruning(
    tiny_checkpoint: Path, clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model in bf16 (head size 16: the split attention and these kernels run): the same tokens and
    pruned steps with DP on the kernels as with its torch operations, over a gate that prunes some steps."""
    calls = []
    step = dp_kernels.pruning_step
    monkeypatch.setattr("dycoke.methods.dycoke.pruning_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    qa = VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cuda"))
    prepared = qa.prepare(clip, VideoOptions(num_frames=8))
    questions = ["What moves?", "Describe the scene in detail, please.", "Why?"]
    reports = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(dp_kernels.DP_KERNELS_ENV, switch)
        run = RunOptions(
            video=VideoOptions(num_frames=8),
            generation=GenerationOptions(max_new_tokens=16, min_new_tokens=16, decoder="graph"),
            method=MethodOptions(method="dycoke", prune_layer=2, gate_threshold=0.999),
        )
        reports[switch] = [qa.answer_many(prepared, questions, run, batch_size=batch) for batch in (1, 3)]
        assert bool(calls) == (switch == "1")
        calls.clear()
    for on, off in zip(reports["1"], reports["0"], strict=True):
        assert [r.token_ids for r in on] == [r.token_ids for r in off]
        shares = [r.compression["pruned_step_share"] for r in on]
        assert shares == [r.compression["pruned_step_share"] for r in off]
    assert min(shares) > 0
