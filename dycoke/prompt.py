"""The chat prompt and the run of ``<video>`` placeholder tokens in it.

The prompt holds one ``<video>`` token; before generation it is expanded to as many placeholder ids
as there are visual tokens given to the LLM (F*196 + 1 uncompressed, fewer after compression), so
every later position is contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from dycoke.config import PromptOptions
from dycoke.errors import ConfigError, ModelLoadError

VIDEO_TOKEN = "<video>"

Turn = tuple[str, str]  # (role, text), role "user" or "assistant"
Question = str | Sequence[Turn]  # one question, or a conversation ending with a user turn


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
    return checkpoint_conversation(tokenizer, [("user", question)])


def conversation_turns(question: Question) -> list[Turn]:
    """``question`` as checked turns: user first and last, roles alternating, no empty text."""
    turns = [("user", question)] if isinstance(question, str) else [(str(r), str(t)) for r, t in question]
    if not turns:
        raise ConfigError("a conversation needs at least one user turn")
    for index, (role, text) in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ConfigError(
                f"turn {index + 1} of the conversation must be '{expected}' (user and assistant alternate, "
                f"starting and ending with user), got '{role}'"
            )
        if not text.strip():
            raise ConfigError("question must not be empty" if len(turns) == 1 else f"turn {index + 1} is empty")
    if turns[-1][0] != "user":
        raise ConfigError("a conversation must end with a user turn (the question to answer)")
    return turns


def paper_conversation(turns: Sequence[Turn], system_prompt: str) -> str:
    """The paper's prompt for several turns: the video goes with the first user turn."""
    text = f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    for index, (role, content) in enumerate(turns):
        body = f"{VIDEO_TOKEN}\n{content}" if index == 0 else content
        text += f"<|im_start|>{role}\n{body}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def checkpoint_conversation(tokenizer: Tokenizer, turns: Sequence[Turn]) -> str:
    """The checkpoint's chat template over several turns (the video in the first user turn)."""
    conversation: list[dict[str, Any]] = []
    for index, (role, content) in enumerate(turns):
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}]
        conversation.append({"role": role, "content": ([{"type": "video"}] if index == 0 else []) + parts})
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # transformers raises ValueError when no template exists
        raise ModelLoadError(f"the checkpoint has no usable chat template ({exc}); use --prompt paper") from exc
    if VIDEO_TOKEN not in str(text):
        raise ModelLoadError("the checkpoint's chat template does not render a <video> token; use --prompt paper")
    return str(text)


CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>")


def check_plain_text(tokenizer: Tokenizer, turns: Sequence[Turn]) -> None:
    """Raise ConfigError if a turn's text holds a special token (it would be parsed as one: a question
    could then end its own turn and write others)."""
    specials = set(CHAT_MARKERS) | set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials.discard(VIDEO_TOKEN)  # reported by expand_video_placeholder with its own advice
    for _, text in turns:
        for token in specials:
            if token and token in text:
                raise ConfigError(f"the text must not contain the special token '{token}'")


def render_prompt(tokenizer: Tokenizer, question: Question, options: PromptOptions) -> str:
    """The prompt text with exactly one ``<video>`` token, for one question or a conversation."""
    turns = conversation_turns(question)
    check_plain_text(tokenizer, turns)
    if options.style == "checkpoint":
        return checkpoint_conversation(tokenizer, turns)
    if len(turns) == 1:
        return paper_prompt(turns[0][1], options.system_prompt)
    return paper_conversation(turns, options.system_prompt)


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
