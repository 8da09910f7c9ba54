"""Reading a checkpoint's weights ahead of the model code (``dycoke.weights``), on the CPU here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dycoke.config import ModelOptions
from dycoke.errors import ModelLoadError
from dycoke.model import load_model
from dycoke.weights import WeightPrefetch, checkpoint_files, prefetch_weights, weight_bytes


def test_weight_bytes_reads_the_headers_and_casts_float_tensors(tiny_checkpoint: Path) -> None:
    from safetensors.torch import load_file

    tensors = {k: v for f in tiny_checkpoint.glob("*.safetensors") for k, v in load_file(f).items()}
    as_stored = sum(t.numel() * t.element_size() for t in tensors.values())
    as_bf16 = sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors.values())
    assert weight_bytes(tiny_checkpoint, torch.float32) == as_stored  # the tiny checkpoint is float32
    assert weight_bytes(tiny_checkpoint, torch.bfloat16) == as_bf16 < as_stored


def test_a_model_built_from_read_weights_equals_the_plain_load(tiny_checkpoint: Path) -> None:
    options = ModelOptions(model=str(tiny_checkpoint), device="cpu")
    prefetch = WeightPrefetch(tiny_checkpoint, torch.device("cpu"), torch.float32)
    built = load_model(options, prefetch)
    plain = load_model(options)
    assert prefetch.take() is None  # handed over once
    ours, theirs = built.model.state_dict(), plain.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert built.random_weights and built.tokenizer.vocab_size == plain.tokenizer.vocab_size
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(built.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)


def test_a_failed_read_falls_back_to_the_plain_load_and_its_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    for file in broken.glob("*.safetensors"):
        file.write_bytes(b"not a safetensors file")
    prefetch = WeightPrefetch(broken, torch.device("cpu"), torch.float32)
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(ModelOptions(model=str(broken), device="cpu"), prefetch)


def test_no_prefetch_where_it_cannot_help(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert prefetch_weights(ModelOptions(model=str(tiny_checkpoint), device="cpu")) is None
    assert prefetch_weights(ModelOptions(model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")) is None
    assert prefetch_weights(ModelOptions(model=str(tmp_path / "missing"))) is None
    assert prefetch_weights(ModelOptions(model=str(tiny_checkpoint), device_map="auto")) is None
    monkeypatch.setenv("DYCOKE_PREFETCH_WEIGHTS", "0")  # turned off: not even on a GPU
    assert prefetch_weights(ModelOptions(model=str(tiny_checkpoint), device="auto")) is None


def test_the_files_read_are_those_from_pretrained_reads(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    assert checkpoint_files(tmp_path) == [tmp_path / "model.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}})
    )
    assert checkpoint_files(tmp_path) == [tmp_path / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.safetensors").write_bytes(b"")
    (other / "a.safetensors").write_bytes(b"")
    assert checkpoint_files(other) == [other / "a.safetensors", other / "b.safetensors"]


def test_read_safetensors_equals_safetensors_own_reader(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from dycoke.weights import read_safetensors

    stored = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).to(torch.float16),
        "i64": torch.arange(6).view(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    file = tmp_path / "model.safetensors"
    save_file(stored, str(file))
    theirs = load_file(str(file))
    ours = read_safetensors(file, torch.device("cpu"), torch.float32)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        expected = theirs[name].float() if theirs[name].is_floating_point() else theirs[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    as_bf16 = read_safetensors(file, torch.device("cpu"), torch.bfloat16)
    assert as_bf16["f32"].dtype == torch.bfloat16 and as_bf16["i64"].dtype == torch.int64
    assert torch.equal(as_bf16["bf16"], stored["bf16"])


def test_read_safetensors_refuses_a_truncated_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from dycoke.weights import read_safetensors

    file = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(file))
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="offsets"):
        read_safetensors(file, torch.device("cpu"), torch.float32)


def test_the_model_takes_the_read_tensors_without_a_copy(tiny_checkpoint: Path) -> None:
    """transformers' build from a state dict keeps tensors already on the right device in the right
    dtype (``_materialize_copy`` is a ``.to`` that returns them as they are). The read-ahead still asks
    for room for two copies; this pins the fact a lighter rule would rest on."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    from dycoke.weights import read_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(tiny_checkpoint):
        tensors.update(read_safetensors(file, torch.device("cpu"), torch.float32))
    storage = {t.data_ptr() for t in tensors.values()}
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        None, config=AutoConfig.from_pretrained(tiny_checkpoint), state_dict=dict(tensors), dtype=torch.float32
    )
    params = model.state_dict()
    assert params and all(p.data_ptr() in storage for p in params.values())
