"""The tiny random-weight checkpoint: real on-disk format, offline reload, real token geometry, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Tokenizer,
)

from dycoke.errors import ConfigError
from dycoke.tiny import (
    CHAT_TEMPLATE,
    RANDOM_MARKER_KEY,
    TINY_BPE_SIZE,
    TINY_VOCAB_SIZE,
    build_tiny_checkpoint,
    build_tiny_model,
    build_tiny_tokenizer,
    checkpoint_is_random,
    real_shape_config,
    tiny_config,
)

FRAMES = 4
TOKENS_PER_FRAME = 14 * 14  # 27 x 27 SigLIP patches, bilinearly pooled to ceil(27 / 2) = 14 per side
VIDEO_TOKENS = FRAMES * TOKENS_PER_FRAME + 1  # + the trailing image_newline


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> LlavaOnevisionForConditionalGeneration:
    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_checkpoint, use_safetensors=True).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _video_prompt(tokenizer: Any, question: str, placeholders: int = VIDEO_TOKENS) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<video>", "<video>" * placeholders)
    return dict(tokenizer(text, return_tensors="pt"))


def _video(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, FRAMES, 3, 384, 384, generator=generator) * 2 - 1  # normalised pixels in [-1, 1]


def _greedy(model: Any, inputs: dict[str, torch.Tensor], video: torch.Tensor, n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, pixel_values_videos=video, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_folder_looks_like_a_llava_hf_checkpoint(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "processor_config.json",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    size = sum(p.stat().st_size for p in tiny_checkpoint.iterdir())
    assert size < 4 * 2**20, f"checkpoint is {size} bytes"

    video = json.loads((tiny_checkpoint / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "LlavaOnevisionVideoProcessor"
    assert video["size"] == {"height": 384, "width": 384}
    assert video["resample"] == 3  # bicubic
    assert video["rescale_factor"] == pytest.approx(1 / 255)
    assert video["image_mean"] == video["image_std"] == [0.5, 0.5, 0.5]
    assert video["do_convert_rgb"] is True
    image = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert image["image_processor_type"] == "LlavaOnevisionImageProcessor"
    assert image["size"] == {"height": 384, "width": 384}
    processor = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert processor["processor_class"] == "LlavaOnevisionProcessor"
    assert processor["num_image_tokens"] == 729
    assert processor["vision_feature_select_strategy"] == "full"
    assert (processor["image_token"], processor["video_token"]) == ("<image>", "<video>")


def test_config_reloads_with_real_geometry(tiny_checkpoint: Path) -> None:
    config: Any = AutoConfig.from_pretrained(tiny_checkpoint)
    assert isinstance(config, LlavaOnevisionConfig)
    vision: Any = config.vision_config
    text: Any = config.text_config
    assert (vision.model_type, vision.image_size, vision.patch_size) == ("siglip_vision_model", 384, 14)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert text.model_type == "qwen2"
    assert text.num_attention_heads > text.num_key_value_heads  # GQA, like the real decoders
    assert text.rope_parameters["rope_theta"] == 1e6
    assert text.vocab_size == TINY_VOCAB_SIZE and TINY_VOCAB_SIZE % 64 == 0
    assert config.tie_word_embeddings and text.tie_word_embeddings
    assert getattr(config, RANDOM_MARKER_KEY) is True
    assert getattr(config, "_attn_implementation", None) in (None, "sdpa")


def test_model_reloads_offline_with_the_built_weights(tiny_checkpoint: Path, model: Any) -> None:
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in the 0.5B
    built = build_tiny_model(seed=0).state_dict()
    loaded = model.state_dict()
    assert built.keys() == loaded.keys()
    for name, tensor in built.items():
        assert torch.equal(tensor, loaded[name]), name
    # rows past the tokenizer are the zero padding of the embedding matrix
    assert not model.get_input_embeddings().weight[TINY_BPE_SIZE + 5 :].any()


def test_special_tokens_are_single_ids_matching_the_config(tiny_checkpoint: Path, tokenizer: Any) -> None:
    assert isinstance(tokenizer, Qwen2Tokenizer)
    config: Any = AutoConfig.from_pretrained(tiny_checkpoint)
    ids = {}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"):
        encoded = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
        assert len(encoded) == 3, (token, encoded)
        ids[token] = encoded[1]
        assert tokenizer.convert_tokens_to_ids(token) == ids[token]
    assert ids["<image>"] == config.image_token_id
    assert ids["<video>"] == config.video_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids["<|im_end|>"] == config.text_config.eos_token_id
    assert generation["pad_token_id"] == ids["<|endoftext|>"]
    assert len(tokenizer) == TINY_BPE_SIZE + 5 <= config.text_config.vocab_size
    # special tokens are dropped on request, plain text round-trips
    text = "What is the man cooking in the kitchen? Answer: 42 onions, café."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.decode(tokenizer(f"<video>{text}<|im_end|>")["input_ids"], skip_special_tokens=True) == text


def test_chat_template_renders_the_llava_onevision_format(tokenizer: Any) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Who waves?"}, {"type": "video"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWho waves?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[1:], tokenize=False)
    assert no_prompt == "<|im_start|>user\n<video>\nWho waves?<|im_end|>\n"
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert "<image>\nHi" in tokenizer.apply_chat_template(image, tokenize=False)


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    other = build_tiny_checkpoint(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_build_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(seed=7, text_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_random_marker(tiny_checkpoint: Path, tmp_path: Path, model: Any) -> None:
    assert checkpoint_is_random(tiny_checkpoint)
    assert checkpoint_is_random(str(tiny_checkpoint))
    assert checkpoint_is_random(AutoConfig.from_pretrained(tiny_checkpoint))
    assert checkpoint_is_random(model)
    assert checkpoint_is_random(real_shape_config("7b"))
    assert not checkpoint_is_random(LlavaOnevisionConfig())
    assert not checkpoint_is_random(tmp_path / "missing")
    real_like = tmp_path / "real"
    real_like.mkdir()
    data = json.loads((tiny_checkpoint / "config.json").read_text())
    del data[RANDOM_MARKER_KEY]
    (real_like / "config.json").write_text(json.dumps(data))
    assert not checkpoint_is_random(real_like)
    (real_like / "config.json").write_text("{not json")
    assert not checkpoint_is_random(real_like)


def test_video_forward_and_generate(model: Any, tokenizer: Any) -> None:
    inputs = _video_prompt(tokenizer, "What is happening in this video?")
    video_id = model.config.video_token_id
    assert int((inputs["input_ids"] == video_id).sum()) == VIDEO_TOKENS == 785

    with torch.no_grad():
        features = model.model.get_video_features(_video(0)).pooler_output
        # 196 pooled tokens per frame; transformers >= 5.2x also appends the image_newline row here (785),
        # 5.17 appends it later, in forward (784)
        assert features.shape[0] == 1 and features.shape[2] == model.config.text_config.hidden_size
        assert features.shape[1] in (VIDEO_TOKENS - 1, VIDEO_TOKENS)
        out = model(**inputs, pixel_values_videos=_video(0))
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], TINY_VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()

    first = _greedy(model, inputs, _video(0))
    assert len(first) == 12
    assert all(t < len(tokenizer) for t in first)  # never a padding row of the embedding matrix
    assert len(set(first)) > 3, f"degenerate generation {first}"
    # the answer depends on the video and on the question: the random model is not degenerate
    assert _greedy(model, inputs, _video(1)) != first
    assert _greedy(model, _video_prompt(tokenizer, "How many people can you see?"), _video(0)) != first
    assert _greedy(model, inputs, _video(0)) == first


def test_wrong_placeholder_count_is_rejected(model: Any, tokenizer: Any) -> None:
    inputs = _video_prompt(tokenizer, "Why?", placeholders=VIDEO_TOKENS - 1)
    with pytest.raises((ValueError, RuntimeError), match="do not match"), torch.no_grad():
        model(**inputs, pixel_values_videos=_video(0))


def test_existing_folder_needs_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    build_tiny_checkpoint(target, text_layers=1)
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        build_tiny_checkpoint(target)
    build_tiny_checkpoint(target, seed=3, text_layers=2, overwrite=True)
    assert AutoConfig.from_pretrained(target).text_config.num_hidden_layers == 2
    assert (target / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        build_tiny_checkpoint(tmp_path / "file")
    with pytest.raises(ConfigError, match="text_layers"):
        build_tiny_checkpoint(tmp_path / "zero", text_layers=0)


def test_tokenizer_build_is_deterministic() -> None:
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_tiny_config_in_memory_matches_the_checkpoint(tiny_checkpoint: Path) -> None:
    saved = AutoConfig.from_pretrained(tiny_checkpoint).to_dict()
    built = tiny_config().to_dict()
    for key in ("text_config", "vision_config", "image_token_index", "video_token_index"):
        assert built[key] == saved[key], key


REAL = {
    # size: hidden, layers, heads, kv heads, FFN, vocab, tied, decoder parameters (published Qwen2 sizes)
    "0.5b": (896, 24, 14, 2, 4864, 151936, True, 494_032_768),
    "7b": (3584, 28, 28, 4, 18944, 152128, False, 7_615_616_512 + 2 * 64 * 3584),
    "72b": (8192, 80, 64, 8, 29568, 152128, False, 72_706_203_648 + 2 * 64 * 8192),
}


@pytest.mark.parametrize("size", sorted(REAL))
def test_real_shape_configs(size: str) -> None:
    hidden, layers, heads, kv_heads, ffn, vocab, tied, decoder_params = REAL[size]
    config: Any = real_shape_config(size)  # type: ignore[arg-type]
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (hidden, layers)
    assert (text.num_attention_heads, text.num_key_value_heads) == (heads, kv_heads)
    assert (text.intermediate_size, text.vocab_size) == (ffn, vocab)
    assert config.tie_word_embeddings is tied
    assert text.rope_parameters["rope_theta"] == 1e6
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 26, 16)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (4304, 14, 384)
    assert (config.image_token_id, config.video_token_id) == (151646, 151647)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert checkpoint_is_random(config)
    # shapes only, no memory: the decoder has the published parameter count (vocab padded to 152128 for 7B/72B)
    with torch.device("meta"):
        meta = LlavaOnevisionForConditionalGeneration(config)
    lm_head = 0 if tied else meta.lm_head.weight.numel()
    assert sum(p.numel() for p in meta.model.language_model.parameters()) + lm_head == decoder_params


def test_real_shape_config_rejects_unknown_sizes() -> None:
    with pytest.raises(ConfigError, match="unknown model size"):
        real_shape_config("13b")  # type: ignore[arg-type]
