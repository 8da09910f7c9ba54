"""Tiny random-weight LLaVA-OneVision checkpoints, built offline, in the real on-disk format.

``build_tiny_checkpoint(DIR)`` writes a folder laid out like ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``
(``config.json``, ``model.safetensors``, ``generation_config.json``, a byte-level BPE tokenizer wrapped as a
Qwen2 tokenizer, the chat template, and the image / video / processor JSON files), so that
``--model DIR`` and ``from_pretrained(DIR)`` work with no network. Its weights are random: answers are
meaningless, but every shape that matters for DyCoke is real. A frame is 384x384 pixels, cut into 27x27 = 729
SigLIP patches and pooled by the model to 14x14 = 196 tokens; a video of ``F`` frames takes ``F * 196 + 1``
``<video>`` placeholders (the ``+ 1`` is the trailing ``image_newline``). Only the widths are tiny.

``real_shape_config(size)`` gives the dimensions of the real 0.5B / 7B / 72B checkpoints, for GPU timing
with random weights. Both kinds of config carry ``dycoke_random_weights: true``, which
:func:`checkpoint_is_random` detects so that the CLI can warn.

Importing this module is cheap: torch, tokenizers and transformers are imported inside the functions that
need them, so :func:`checkpoint_is_random` on a directory costs a JSON read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from dycoke.errors import ConfigError

if TYPE_CHECKING:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        PreTrainedTokenizerBase,
    )

__all__ = [
    "CHAT_TEMPLATE",
    "RANDOM_MARKER_KEY",
    "TINY_BPE_SIZE",
    "TINY_IMAGE_TOKEN_ID",
    "TINY_VIDEO_TOKEN_ID",
    "TINY_VOCAB_SIZE",
    "build_tiny_checkpoint",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "checkpoint_is_random",
    "real_shape_config",
    "tiny_config",
]

RANDOM_MARKER_KEY: Final = "dycoke_random_weights"
"""Key set to ``true`` in ``config.json`` of every checkpoint this module makes (kept by transformers 5.x)."""

IMAGE_TOKEN: Final = "<image>"
VIDEO_TOKEN: Final = "<video>"
SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN)
"""Added after the BPE vocabulary in this order, as in Qwen2 + llava-hf (151643 ... 151647 there)."""

TINY_BPE_SIZE: Final = 1000
"""Size of the trained byte-level BPE vocabulary (256 byte symbols + 744 merges); checked at build time."""
TINY_ENDOFTEXT_ID: Final = TINY_BPE_SIZE
TINY_IM_START_ID: Final = TINY_BPE_SIZE + 1
TINY_IM_END_ID: Final = TINY_BPE_SIZE + 2
TINY_IMAGE_TOKEN_ID: Final = TINY_BPE_SIZE + 3
TINY_VIDEO_TOKEN_ID: Final = TINY_BPE_SIZE + 4
TINY_VOCAB_SIZE: Final = 64 * math.ceil((TINY_BPE_SIZE + len(SPECIAL_TOKENS)) / 64)
"""Embedding rows of the tiny model: the tokenizer's size rounded up to a multiple of 64 (1024)."""

# The real geometry: SigLIP so400m at 384 px with 14 px patches -> 27 x 27 = 729 patch tokens per frame.
IMAGE_SIZE: Final = 384
PATCH_SIZE: Final = 14
NUM_IMAGE_TOKENS: Final = (IMAGE_SIZE // PATCH_SIZE) ** 2

# Real ids of the llava-hf LLaVA-OneVision checkpoints (Qwen2 vocabulary + two added tokens).
REAL_ENDOFTEXT_ID: Final = 151643
REAL_IM_END_ID: Final = 151645
REAL_IMAGE_TOKEN_ID: Final = 151646
REAL_VIDEO_TOKEN_ID: Final = 151647

# Widths of the real checkpoints' Qwen2 decoders; the SigLIP tower is the same for all three.
_REAL_TEXT: Final[dict[str, dict[str, int]]] = {
    "0.5b": {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_window_layers": 24,
    },
    "7b": {
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152128,
        "max_window_layers": 28,
    },
    "72b": {
        "hidden_size": 8192,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 29568,
        "vocab_size": 152128,
        "max_window_layers": 80,
    },
}
_REAL_TIED: Final = {"0.5b": True, "7b": False, "72b": False}
_REAL_VISION: Final[dict[str, Any]] = {
    "hidden_size": 1152,
    "num_hidden_layers": 26,  # so400m has 27; llava-hf drops the last one and selects layer -1 (= -2 of 27)
    "num_attention_heads": 16,
    "intermediate_size": 4304,
}

ROPE_THETA: Final = 1_000_000.0
TINY_TEXT_INIT_STD: Final = 0.5
"""Init std of the tiny decoder (transformers' default 0.02 makes greedy decoding echo the last token)."""

CHAT_TEMPLATE: Final = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{#- media placeholders first, then the text, as LLaVA-OneVision was trained -#}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'video' -%}{{- '<video>\\n' -}}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- item['text'] -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""Qwen2 / LLaVA-OneVision chat format: ``<|im_start|>role\\n``, media placeholders, text, ``<|im_end|>\\n``.

A content item ``{"type": "video"}`` renders as ``<video>\\n`` (``{"type": "image"}`` as ``<image>\\n``)
before the message's text; string contents are rendered as they are.
"""

# Files written by build_tiny_checkpoint (besides *.safetensors); `overwrite=True` replaces only these.
_WRITTEN_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)

_CORPUS: Final = """\
The video opens on a quiet street early in the morning. A woman in a red coat walks her small brown dog
past a bakery, and the baker waves at them through the window. Two cars drive by slowly, then a bus stops
at the corner and three children climb on board with their school bags. The camera follows the bus for a
while before it turns left and disappears behind a tall grey building.

In the next scene a man is cooking dinner in a bright kitchen. He cuts onions, carrots and green peppers
on a wooden board, drops them into a hot pan and stirs them with a spoon. Steam rises from a pot of water
on the back of the stove. He tastes the sauce, adds some salt and pepper, and smiles at someone who is not
visible in the frame. A cat jumps onto the counter and he gently puts it back on the floor.

Later the clip shows a football match on a green field under heavy clouds. The players in white shirts
pass the ball quickly along the left side, a defender slides into a tackle, and the referee blows his
whistle. The crowd stands up and shouts. After a short break the team in blue scores a goal with a high
kick from outside the box, and the goalkeeper lies on the grass for a moment, looking at the sky.

What is happening in this video? How many people can you see, and what are they doing? Which animal
appears first, and what colour is it? Where does the story take place, and does the weather change from
the beginning to the end? Describe the main events in order, and explain why the people react the way
they do. Answer with one word if you can, or with a short sentence if you must.

Questions about videos often ask about actions, objects, places, counting and time. A good answer looks
at every frame, notices what moves and what stays still, and remembers the order of events. Long videos
repeat the same background for many seconds, so most of the frames carry little new information, and a
model can merge similar tokens, drop the ones that nobody attends to, and still answer correctly.

The final part of the recording was filmed near the sea. Waves break against dark rocks, birds fly low
over the water, and a small boat with a yellow sail moves towards the harbour. An old fisherman sits on a
bench, repairs a net with his hands and talks to a young girl who holds an ice cream. The sun goes down,
the lights of the town come on one by one, and the video ends with a slow fade to black.

Numbers and times also appear: 1, 2, 3, 10, 25, 100, 2024, at 7:30 in the morning, for 45 seconds, in
the first minute, near the end. People say yes or no, maybe, probably, certainly, never and always; they
ask who, what, when, where, why and how, and they expect short, clear and honest replies.

Inside a museum, visitors move slowly between paintings of mountains, rivers and forests. A guide points
at a large picture of a horse and explains how the artist mixed his colours. Somebody takes a photograph,
a phone rings, and a tired father carries his sleeping son towards the exit, where the rain has stopped.
"""


def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on the embedded corpus; return its vocabulary and merges.

    The pre-tokenizer is Qwen2's (its split regex, then byte-level mapping), so that the vocabulary and the
    merges mean the same thing once ``Qwen2Tokenizer`` rebuilds the pipeline around them.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    model_state = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model_state["vocab"])
    merges: list[tuple[str, str]] = []
    for merge in model_state["merges"]:  # ["a", "b"] pairs in tokenizers >= 0.20, "a b" strings before
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((left, right))
    if len(vocab) != TINY_BPE_SIZE:
        raise RuntimeError(
            f"the embedded corpus trained a BPE vocabulary of {len(vocab)} tokens, expected {TINY_BPE_SIZE}"
        )
    return vocab, merges


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Build the tiny checkpoint's tokenizer offline: a byte-level BPE wrapped as ``Qwen2Tokenizer``.

    The BPE (:data:`TINY_BPE_SIZE` tokens) is trained on a few embedded English paragraphs with Qwen2's
    pre-tokenizer; ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos), ``<image>`` and
    ``<video>`` follow it as special tokens with ids ``TINY_BPE_SIZE + 0 ... + 4``, each a single id. The
    chat template is :data:`CHAT_TEMPLATE`.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    # No special token is named at construction (Qwen2Tokenizer would add them in its own order); they are
    # added below in Qwen2's order. `merges` must be (left, right) pairs, whatever the annotation says.
    options: dict[str, Any] = {
        "vocab": vocab,
        "merges": merges,
        "unk_token": None,
        "bos_token": None,
        "eos_token": None,
        "pad_token": None,
        "model_max_length": 32768,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }
    tokenizer = Qwen2Tokenizer(**options)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_special_tokens(
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        }
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(TINY_BPE_SIZE, TINY_BPE_SIZE + len(SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"special token ids came out as {ids}, expected {expected}")
    return tokenizer


def _vision_config(*, hidden: int, layers: int, heads: int, ffn: int) -> dict[str, Any]:
    """SigLIP vision-tower settings with the real 384 px / 14 px geometry and the given widths."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "vision_use_head": False,
    }


def _text_config(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    ffn: int,
    vocab: int,
    tied: bool,
    eos_id: int,
    pad_id: int,
    max_window_layers: int,
    initializer_range: float = 0.02,
) -> dict[str, Any]:
    """Qwen2 decoder settings (RoPE theta 1e6, RMSNorm eps 1e-6, no sliding window), as in LLaVA-OV."""
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": max_window_layers,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        "initializer_range": initializer_range,
        "bos_token_id": pad_id,  # Qwen2: bos = pad = <|endoftext|> (no BOS is ever prepended)
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
    }


def _llava_config(
    vision: dict[str, Any], text: dict[str, Any], *, image_token_id: int, video_token_id: int
) -> LlavaOnevisionConfig:
    """Assemble a ``LlavaOnevisionConfig`` like llava-hf's: layer -1 of the tower, "full" (no CLS to drop)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = {k: v for k, v in vision.items() if k != "model_type"}
    text = {k: v for k, v in text.items() if k != "model_type"}
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision),
        text_config=Qwen2Config(**text),
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text["tie_word_embeddings"]),
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    setattr(config, RANDOM_MARKER_KEY, True)
    return config


def tiny_config(
    *,
    text_layers: int = 4,
    vision_layers: int = 2,
    initializer_range: float = TINY_TEXT_INIT_STD,
) -> LlavaOnevisionConfig:
    """Config of the tiny checkpoint: real token geometry, tiny widths, ids of :func:`build_tiny_tokenizer`.

    Vision: SigLIP at 384 px / 14 px patches (729 patches, pooled to 196 tokens per frame), hidden 32,
    ``vision_layers`` layers, 2 heads, FFN 64. Text: Qwen2 with hidden 64, ``text_layers`` layers, 4 query
    heads sharing 2 KV heads (GQA like the real models), FFN 128, vocabulary :data:`TINY_VOCAB_SIZE`, tied
    embeddings like the 0.5B. ``initializer_range`` is the decoder's init std (see
    :data:`TINY_TEXT_INIT_STD`). The config is marked random (:data:`RANDOM_MARKER_KEY`).
    """
    if text_layers < 1:
        raise ConfigError(f"text_layers must be a positive integer, got {text_layers}")
    if vision_layers < 1:
        raise ConfigError(f"vision_layers must be a positive integer, got {vision_layers}")
    vision = _vision_config(hidden=32, layers=vision_layers, heads=2, ffn=64)
    text = _text_config(
        hidden=64,
        layers=text_layers,
        heads=4,
        kv_heads=2,
        ffn=128,
        vocab=TINY_VOCAB_SIZE,
        tied=True,
        eos_id=TINY_IM_END_ID,
        pad_id=TINY_ENDOFTEXT_ID,
        max_window_layers=text_layers,
        initializer_range=initializer_range,
    )
    return _llava_config(vision, text, image_token_id=TINY_IMAGE_TOKEN_ID, video_token_id=TINY_VIDEO_TOKEN_ID)


def real_shape_config(size: Literal["0.5b", "7b", "72b"]) -> LlavaOnevisionConfig:
    """Config with the dimensions of ``llava-hf/llava-onevision-qwen2-{size}-ov-hf``, for timing.

    SigLIP so400m tower as converted by llava-hf (1152 wide, 26 layers, 16 heads, FFN 4304, 384 px, 14 px
    patches), Qwen2 decoder of the given size, the real ``<image>`` / ``<video>`` ids (151646 / 151647). No
    weights come with it: build the model from it (e.g. on the GPU, in bf16). Marked random.
    """
    key = size.lower()
    if key not in _REAL_TEXT:
        raise ConfigError(f"unknown model size '{size}'; choose one of {', '.join(_REAL_TEXT)}")
    dims = _REAL_TEXT[key]
    vision = _vision_config(
        hidden=_REAL_VISION["hidden_size"],
        layers=_REAL_VISION["num_hidden_layers"],
        heads=_REAL_VISION["num_attention_heads"],
        ffn=_REAL_VISION["intermediate_size"],
    )
    text = _text_config(
        hidden=dims["hidden_size"],
        layers=dims["num_hidden_layers"],
        heads=dims["num_attention_heads"],
        kv_heads=dims["num_key_value_heads"],
        ffn=dims["intermediate_size"],
        vocab=dims["vocab_size"],
        tied=_REAL_TIED[key],
        eos_id=REAL_IM_END_ID,
        pad_id=REAL_ENDOFTEXT_ID,
        max_window_layers=dims["max_window_layers"],
    )
    return _llava_config(vision, text, image_token_id=REAL_IMAGE_TOKEN_ID, video_token_id=REAL_VIDEO_TOKEN_ID)


def checkpoint_is_random(source: object) -> bool:
    """Whether ``source`` was made by this module (random weights): a config, a model, or a checkpoint dir.

    A directory (``str`` / ``Path``) is judged from its ``config.json`` without importing transformers; a
    missing or unreadable file counts as not random. A model is judged by its ``.config``.
    """
    if isinstance(source, (str, os.PathLike)):
        config_file = Path(source) / "config.json"
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get(RANDOM_MARKER_KEY) is True
    config = getattr(source, "config", source)
    return getattr(config, RANDOM_MARKER_KEY, False) is True


def _processor_files() -> dict[str, dict[str, Any]]:
    """The image-processor, video-processor and processor JSON files of a llava-hf checkpoint.

    Written directly: instantiating ``LlavaOnevisionVideoProcessor`` needs torchvision, which is not always
    installed. The values are llava-hf's (384x384, bicubic, 1/255, mean = std = 0.5).
    """
    from transformers import LlavaOnevisionConfig

    common: dict[str, Any] = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }
    image = {
        **common,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_center_crop": None,
        "do_pad": True,
        "image_grid_pinpoints": LlavaOnevisionConfig().image_grid_pinpoints,
        "image_processor_type": "LlavaOnevisionImageProcessor",
    }
    video = {
        **common,
        "do_center_crop": None,
        "do_sample_frames": False,
        "default_to_square": False,
        "video_processor_type": "LlavaOnevisionVideoProcessor",
    }
    processor = {
        "image_token": IMAGE_TOKEN,
        "num_image_tokens": NUM_IMAGE_TOKENS,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": VIDEO_TOKEN,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_select_strategy": "full",
    }
    return {
        "preprocessor_config.json": image,
        "video_preprocessor_config.json": video,
        "processor_config.json": processor,
    }


def build_tiny_model(*, seed: int = 0, text_layers: int = 4) -> LlavaOnevisionForConditionalGeneration:
    """Build the tiny random model in memory (what :func:`build_tiny_checkpoint` saves), in eval mode.

    Weights are drawn from :func:`tiny_config` under ``torch.manual_seed(seed)`` without disturbing the
    caller's global RNG state. The embedding rows past the tokenizer's last id (padding up to a multiple of
    64) are zeroed: with tied embeddings their logits are then 0, below the best real token's, so greedy
    decoding never emits an id the tokenizer cannot decode (a trained model never emits them either).
    """
    import torch
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration

    config = tiny_config(text_layers=text_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    used_rows = TINY_BPE_SIZE + len(SPECIAL_TOKENS)
    with torch.no_grad():
        for name, param in model.named_parameters():  # lm_head.weight is tied: listed once, as embed_tokens
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param[used_rows:] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=TINY_ENDOFTEXT_ID,
        eos_token_id=TINY_IM_END_ID,
        pad_token_id=TINY_ENDOFTEXT_ID,
    )
    return model.eval()


def build_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    text_layers: int = 4,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random-weight LLaVA-OneVision checkpoint to ``out_dir`` and return its path.

    The folder loads offline with ``LlavaOnevisionForConditionalGeneration.from_pretrained(out_dir,
    use_safetensors=True)`` and ``AutoTokenizer.from_pretrained(out_dir)``. Weights come from
    :func:`tiny_config` under ``torch.manual_seed(seed)``: the same seed gives the same bytes. ``out_dir``
    must be missing or empty unless ``overwrite`` is true, which replaces only the files this function writes.

    Raises:
        ConfigError: ``text_layers`` < 1, or ``out_dir`` is a file or a non-empty folder without
            ``overwrite``.
    """
    if text_layers < 1:
        raise ConfigError(f"text_layers must be a positive integer, got {text_layers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace a checkpoint in it")
        for name in _WRITTEN_FILES:
            (out / name).unlink(missing_ok=True)
        for weights in out.glob("*.safetensors"):
            weights.unlink()
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(seed=seed, text_layers=text_layers)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, content in _processor_files().items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # transformers writes the weights through a private temporary file (mode 0600); give them the mode
    # that the umask gives every other file of the folder.
    for weights in out.glob("*.safetensors"):
        shutil.copymode(out / "config.json", weights)
    return out


def build_real_shape_checkpoint(
    out_dir: str | os.PathLike[str], size: Literal["0.5b", "7b", "72b"], *, device: str = "cuda"
) -> Path:
    """Write a random-weight checkpoint with the real shapes of ``size`` (bf16 on a GPU: 7B is about
    16 GB) in the on-disk format of a real one, to time what a user pays for loading and start-up.

    The offline tokenizer's ``<image>``/``<video>`` ids replace the real ones (the real vocabulary is
    larger, so they are valid). Weights are whatever ``_from_config`` initialises, built on ``device``.
    """
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = real_shape_config(size)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for name, content in _processor_files().items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    del model
    return out
