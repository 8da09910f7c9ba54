"""A batch prefilled (and its first decode step taken) a group of rows at a time, as DP eviction does to
lower its memory peak (``GenerationOptions.prefill_rows``), answers exactly as the whole batch at once
and as transformers' ``generate``: tokens, DP's figures and the cache it keeps."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import dycoke.decoding as decoding
from dycoke.compress.kv_prune import PruneState
from dycoke.config import GenerationOptions, MethodOptions, ModelOptions, RunOptions, VideoOptions
from dycoke.decoding.static import RowGroups, StaticGreedyDecoder
from dycoke.errors import ConfigError
from dycoke.methods.dycoke import Eviction
from dycoke.pipeline import PreparedVideo, VideoQA
from tests.test_dp_exact import make_batch
from tests.videos import textured_frames, write_video

QUESTIONS = [
    "What moves in the video?",
    "Why is the sky that colour, and what else can you see?",
    "Who?",
    "Where does it happen?",
    "How many animals are there in the whole clip?",
]
FIGURES = ("pruned_step_share", "avg_visual_attended_late_layers", "evicted_wanted_back_avg_tokens", "evicted")


@pytest.fixture(scope="module")
def qa(tiny_checkpoint: Path) -> VideoQA:
    return VideoQA.load(ModelOptions(model=str(tiny_checkpoint), device="cpu"))


@pytest.fixture(scope="module")
def prepared(qa: VideoQA, tmp_path_factory: pytest.TempPathFactory) -> PreparedVideo:
    clip = write_video(tmp_path_factory.mktemp("rg") / "c.mp4", textured_frames(16, 96, 128, seed=5), fps=8)
    return qa.prepare(clip, VideoOptions(num_frames=8))


def run(decoder: str, prefill_rows: int, new_tokens: int = 8, **method: Any) -> RunOptions:
    return RunOptions(
        video=VideoOptions(num_frames=8),
        generation=GenerationOptions(
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, decoder=decoder, prefill_rows=prefill_rows
        ),
        method=MethodOptions(method="dycoke", prune_layer=2, dp_evict=True, **method),
    )


@pytest.fixture
def groups_seen(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every prefill the static decoder runs."""
    seen: list[int] = []
    real = StaticGreedyDecoder._prefill

    def prefill(self: StaticGreedyDecoder, embeds: torch.Tensor, *args: Any) -> None:
        seen.append(int(embeds.shape[0]))
        real(self, embeds, *args)

    monkeypatch.setattr(StaticGreedyDecoder, "_prefill", prefill)
    return seen


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("rows,groups", [(2, [2, 2, 1]), (1, [1] * 5), (4, [4, 1])])
@pytest.mark.parametrize("method", [{}, {"gate_threshold": 0.99, "gate_mode": "reuse"}])
def test_groups_answer_as_the_whole_batch_and_generate(
    qa: VideoQA,
    prepared: PreparedVideo,
    groups_seen: list[int],
    share: bool,
    rows: int,
    groups: list[int],
    method: dict[str, Any],
) -> None:
    hf = qa.answer_many(prepared, QUESTIONS, run("hf", 0, **method), share_prefix=share, batch_size=5)
    whole = qa.answer_many(prepared, QUESTIONS, run("static", 0, **method), share_prefix=share, batch_size=5)
    assert groups_seen == [5]
    groups_seen.clear()
    grouped = qa.answer_many(prepared, QUESTIONS, run("static", rows, **method), share_prefix=share, batch_size=5)
    assert groups_seen == groups
    for a, w, g in zip(hf, whole, grouped, strict=True):
        assert g.token_ids == w.token_ids == a.token_ids, g.question
        for figure in FIGURES:
            assert g.compression.get(figure) == w.compression.get(figure) == a.compression.get(figure), figure
        assert g.memory.kv_cache_bytes == w.memory.kv_cache_bytes == a.memory.kv_cache_bytes
        assert g.compression["dp_evict"] and g.tokens.generated == 8


def test_the_batch_prefix_is_never_expanded_when_grouped(
    qa: VideoQA, prepared: PreparedVideo, monkeypatch: pytest.MonkeyPatch
) -> None:
    expanded: list[int] = []
    real = decoding.expand_prefix

    def expand(prefix: Any, batch: int, **kwargs: Any) -> Any:
        expanded.append(batch)
        return real(prefix, batch, **kwargs)

    monkeypatch.setattr(decoding, "expand_prefix", expand)
    qa.answer_many(prepared, QUESTIONS, run("static", 2), batch_size=5)
    assert expanded == [2, 2, 1]  # each group's own rows only
    expanded.clear()
    qa.answer_many(prepared, QUESTIONS, run("static", 0), batch_size=5)
    assert expanded == [5]


@pytest.mark.parametrize(
    "method,options",
    [
        ("dycoke", {}),  # DP without eviction keeps every entry: nothing to gain from groups
        ("full", {}),
        ("fastv", {}),
    ],
)
def test_only_eviction_prefills_in_groups(
    qa: VideoQA, prepared: PreparedVideo, groups_seen: list[int], method: str, options: dict[str, Any]
) -> None:
    base = run("static", 2)
    chosen = replace(base, method=MethodOptions(method=method, **options))  # type: ignore[arg-type]
    qa.answer_many(prepared, QUESTIONS, chosen, batch_size=5)
    assert groups_seen == [5]


def test_hf_decoder_and_one_token_answers_never_group(
    qa: VideoQA, prepared: PreparedVideo, groups_seen: list[int]
) -> None:
    qa.answer_many(prepared, QUESTIONS, run("hf", 2), batch_size=5)
    one = qa.answer_many(prepared, QUESTIONS, run("static", 2, new_tokens=1), batch_size=5)
    assert groups_seen == [5]  # hf prefills elsewhere; one token means no decode step to take by groups
    alone = qa.answer_many(prepared, QUESTIONS, run("static", 0, new_tokens=1), batch_size=5)
    assert [r.token_ids for r in one] == [r.token_ids for r in alone]


@pytest.mark.parametrize("size", [3, 8])  # 8: the whole batch in one group
@pytest.mark.parametrize("eos,min_new", [([53], 0), ([53, 722], 0), ([11], 0), ([53], 3)])
def test_grouped_end_tokens_as_at_once(tiny_checkpoint: Path, eos: list[int], min_new: int, size: int) -> None:
    """End tokens at the prefill's token, at the first step or later end rows exactly as without groups
    (here with a method that keeps no per-row state: the groups only split the prefill)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    embeds, mask, _ = make_batch(model, [0, 4, 1, 2])
    groups = RowGroups(size=size, prefix=lambda rows: None, scope=lambda start, stop: nullcontext())

    def decode(row_groups: RowGroups | None, new_tokens: int = 10) -> tuple[list[list[int]], list[list[int]]]:
        seen: list[list[int]] = []
        decoder = StaticGreedyDecoder(
            model, max_new_tokens=new_tokens, min_new_tokens=min_new, eos_ids=eos, pad_id=0, use_graph=False
        )
        with torch.inference_mode():
            out = decoder.generate(embeds, mask, on_tokens=lambda t: seen.append(t.tolist()), groups=row_groups)
        return out.tolist(), seen

    assert decode(groups) == decode(None)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 2"):
        decode(groups, new_tokens=1)  # no first decode step to take by groups


def test_a_row_view_of_the_prune_state_writes_into_the_batch() -> None:
    state = PruneState(starts=torch.tensor([0, 1, 2, 3]), num_candidates=4, keep=2, max_steps=3)
    part = state.rows(1, 3)
    attention = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.1, 0.1, 0.3]])
    kept = part.update(attention)
    assert kept.tolist() == [[False, True, True, False], [True, False, False, True]]
    assert state.kept[1:3].tolist() == kept.tolist() and state.kept[[0, 3]].all()
    assert torch.equal(state.previous[1:3], attention) and not state.previous[[0, 3]].any()
    assert state.history[0, 1:3].tolist() == kept.tolist() and not state.history[0, [0, 3]].any()
    assert (int(part.step), int(state.step)) == (1, 0)  # a group's counter is its own
    assert part.span.tolist() == state.span[1:3].tolist()


def test_eviction_gathers_its_groups_rows() -> None:
    whole = Eviction()
    for start, slots in [(0, [[0, 2, 4], [1, 2, 3]]), (2, [[0, 1, 4]])]:
        part = Eviction(
            slots=torch.tensor(slots),
            alive=torch.tensor([[True, False]] * len(slots)),
            prompt_length=6,
            back_steps=torch.arange(len(slots)),
            back_tokens=torch.arange(len(slots)) + start,
        )
        whole.take_rows(part, start, 3)
    assert whole.slots is not None and whole.slots.tolist() == [[0, 2, 4], [1, 2, 3], [0, 1, 4]]
    assert whole.prompt_length == 6 and whole.back_tokens is not None and whole.back_tokens.tolist() == [0, 1, 2]
    whole.take_rows(Eviction(), 0, 3)  # a group that chose nothing changes nothing
    assert whole.slots.tolist()[0] == [0, 2, 4]


def test_prefill_rows_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"prefill-rows must be >= 0 \(0 prefills a batch at once\), got -1"):
        GenerationOptions(prefill_rows=-1)
