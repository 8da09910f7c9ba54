"""The chat prompt and the run of ``<video>`` placeholder tokens in it.

The prompt holds one ``<video>`` token; before generation it is expanded to as many placeholder ids
as there are visual tokens given to the LLM (F*196 + 1 uncompressed, fewer after compression), so
every later position is contiguous.
"""

from __future__ import annotations

from typing import Any, Protocol

from dycoke.config import PromptOptions
from dycoke.errors import ConfigError, ModelLoadError

VIDEO_TOKEN = "<video>"


class Tokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def paper_prompt(question: str, system_prompt: str) -> str:
    """The prompt of the paper's evaluation (lmms-eval, LLaVA-OV's ``qwen_1_5`` template)."""
    return (
        f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n{VIDEO_TOKEN}\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


def checkpoint_prompt(tokenizer: Tokenizer, question: str) -> str:
    """The prompt from the checkpoint's own chat template (video first, then the question)."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # transformers raises ValueError when no template exists
        raise ModelLoadError(f"the checkpoint has no usable chat template ({exc}); use --prompt paper") from exc
    if VIDEO_TOKEN not in str(text):
        raise ModelLoadError("the checkpoint's chat template does not render a <video> token; use --prompt paper")
    return str(text)


def render_prompt(tokenizer: Tokenizer, question: str, options: PromptOptions) -> str:
    """The prompt text with exactly one ``<video>`` token."""
    if not question.strip():
        raise ConfigError("question must not be empty")
    if options.style == "checkpoint":
        return checkpoint_prompt(tokenizer, question)
    return paper_prompt(question, options.system_prompt)


def expand_video_placeholder(ids: list[int], video_token_id: int, count: int) -> tuple[list[int], int]:
    """Replace the single ``video_token_id`` in ``ids`` by a run of ``count`` of them.

    Returns:
        (expanded ids, index of the first placeholder).
    """
    positions = [i for i, t in enumerate(ids) if t == video_token_id]
    if len(positions) != 1:
        raise ConfigError(
            f"the prompt must contain exactly one {VIDEO_TOKEN} token, found {len(positions)} "
            "(remove '<video>' from the question text)"
        )
    at = positions[0]
    return ids[:at] + [video_token_id] * count + ids[at + 1 :], at


def tokenize_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (special tokens written in the text are parsed as such)."""
    encoded = tokenizer(text, add_special_tokens=False)
    return list(encoded["input_ids"])
