"""``dycoke.warm_answer``: the shallow model, its size estimate, and the answer it gives on the CPU (the
GPU check is in ``tests/test_gpu.py``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

from dycoke import warm_answer
from dycoke.model import tokenizer_of
from dycoke.preprocess import PreprocessConfig
from dycoke.tiny import real_shape_config


@pytest.mark.parametrize("size", ["0.5b", "7b"])
def test_the_shallow_model_keeps_every_size_but_the_depth(size: str) -> None:
    config = real_shape_config(size)  # type: ignore[arg-type]
    shallow = warm_answer.shallow_config(config, 4)
    assert shallow.text_config.num_hidden_layers == 4 and shallow.vision_config.num_hidden_layers == 1
    assert config.text_config.num_hidden_layers > 4  # the checkpoint's own configuration is untouched
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(shallow.text_config, name) == getattr(config.text_config, name)
    for name in ("hidden_size", "intermediate_size", "image_size", "patch_size"):
        assert getattr(shallow.vision_config, name) == getattr(config.vision_config, name)
    layer_types = getattr(shallow.text_config, "layer_types", None)
    assert layer_types is None or len(layer_types) == 4


@pytest.mark.parametrize("size", ["0.5b", "7b"])
def test_the_shallow_size_estimate_is_within_two_percent(size: str) -> None:
    shallow = warm_answer.shallow_config(real_shape_config(size), 4)  # type: ignore[arg-type]
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration._from_config(shallow, dtype=torch.bfloat16)
    actual = sum(p.numel() for p in model.parameters()) * 2
    assert abs(warm_answer.shallow_bytes(shallow, torch.bfloat16) - actual) < 0.02 * actual


def test_the_shallow_model_has_a_layer_after_every_default_method_layer() -> None:
    from dycoke.config import MethodOptions

    layers = warm_answer._text_layers()
    assert layers == 4 and layers > MethodOptions().prune_layer and layers > MethodOptions().fastv_layer


def _answer_on_the_cpu(checkpoint: Path, config_dtype: torch.dtype | None = None) -> None:
    config = AutoConfig.from_pretrained(checkpoint)
    for part in (config, config.text_config, config.vision_config):
        part.dtype = config_dtype or part.dtype  # a real checkpoint's configuration names bfloat16
    device = torch.device("cpu")
    model = warm_answer.build_shallow_model(warm_answer.shallow_config(config, 4), device, torch.float32)
    warm_answer.answer_once(  # raises if any stage fails
        model,
        device=device,
        dtype=torch.float32,
        tokenizer=tokenizer_of(str(checkpoint)),
        preprocess=PreprocessConfig.from_pretrained_dir(checkpoint),
        source=str(checkpoint),
    )


def test_the_shallow_model_answers_on_the_cpu(tiny_checkpoint: Path) -> None:
    _answer_on_the_cpu(tiny_checkpoint)


def test_no_warm_answer_off_cuda_or_when_turned_off(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    kwargs = {"tokenizer": lambda: None, "preprocess": None, "source": "", "bytes_to_load": 0}
    assert warm_answer.start_warm_answer(config, device=torch.device("cpu"), dtype=torch.float32, **kwargs) is None
    monkeypatch.setenv(warm_answer.WARM_ANSWER_ENV, "0")
    assert warm_answer.start_warm_answer(config, device=torch.device("cuda"), dtype=torch.float32, **kwargs) is None


def test_waiting_joins_the_warm_answer_and_never_the_thread_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_answer, "_THREADS", [])
    done: list[str] = []

    def itself() -> None:
        time.sleep(0.2)
        warm_answer.wait_for_warm_answer()  # from inside: returns at once (joining itself would raise)
        done.append("itself")

    thread = threading.Thread(target=itself)
    warm_answer._THREADS.append(thread)
    thread.start()
    warm_answer.wait_for_warm_answer()
    assert done == ["itself"] and not thread.is_alive() and warm_answer._THREADS == []


def test_the_tokenizer_is_loaded_once_while_its_files_are_unchanged(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))
    first = tokenizer_of(str(copy))
    assert tokenizer_of(str(copy)) is first
    tokenizer_json = copy / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text() + "\n")  # the same tokenizer, a changed file
    assert tokenizer_of(str(copy)) is not first


def test_building_the_shallow_model_leaves_the_default_dtype_alone(tiny_checkpoint: Path) -> None:
    """transformers builds a sub-model under a process-wide default dtype of its configuration's dtype;
    the warm answer's build must not touch it (the real build may run next to its answer)."""
    seen: list[torch.dtype] = []
    real = torch.set_default_dtype
    try:
        torch.set_default_dtype = lambda d: (seen.append(d), real(d))[1]  # type: ignore[assignment]
        _answer_on_the_cpu(tiny_checkpoint, config_dtype=torch.bfloat16)
    finally:
        torch.set_default_dtype = real  # type: ignore[assignment]
    assert seen == [] and torch.get_default_dtype() == torch.float32
    assert torch.get_default_device() == torch.device("cpu")
