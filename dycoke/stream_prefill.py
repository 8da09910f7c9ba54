"""Prefilling the shared prefix (system prompt, then the video's tokens) chunk by chunk while a forked
child still decodes the video.

The prefix comes before the question in the prompt, so its KV cache does not depend on the question.
Once the first frames are encoded, the method says how many leading frames have final tokens
(``CompressionMethod.stable_frames``: every frame for ``full``, whole windows of four for DyCoke's TTM);
``PrefixStream.advance`` runs the language model over the new ones, continuing the cache
(``attention.chunked_prefill``). At the end the method compresses the whole video once more, and the
tokens prefilled must be exactly its first tokens, or the prefix is thrown away (and prefilled
afterwards as usual). The question then continues the prefix's cache (``dycoke.decoding.prefix``): the
answer is the one-pass answer up to the rounding of attention summed in other chunks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from dycoke.attention import chunked_prefill, language_model_of
from dycoke.decoding.prefix import CACHE_ARGUMENT, PrefixKV
from dycoke.methods import CompressionMethod
from dycoke.model import LoadedModel
from dycoke.sdpa_choice import without_cudnn_attention
from dycoke.transfer import to_device


def chunk_frames(num_frames: int) -> int:
    """Fewest new stable frames worth a prefill chunk: a quarter of the video, at least 16 frames (each
    chunk launches every layer's kernels once; fewer, larger chunks leave a longer tail after the decode)."""
    return max(16, num_frames // 4)


class PrefixStream:
    """The prefix's KV cache, grown chunk by chunk as frames are encoded.

    ``text_ids`` are the prompt's tokens before the video; ``newline`` (1, D) goes after the last frame's
    tokens, as in ``VideoQA.compress``.
    """

    def __init__(self, loaded: LoadedModel, method: CompressionMethod, text_ids: list[int]) -> None:
        self.loaded = loaded
        self.method = method
        self.text_ids = text_ids
        self.cache: Any = DynamicCache()  # its layers hold (1, Hkv, P, d) keys and values
        self.frames_done = 0  # leading frames whose tokens are in the cache
        self.prefilled: list[torch.Tensor] = []  # those tokens, chunk by chunk, for the final check
        self.tokens_done = 0
        self.complete = False  # every frame and the newline prefilled, after chunks that held

    def advance(self, features: torch.Tensor, ready: int, newline: torch.Tensor | None = None) -> None:
        """``features`` (F, T, D), the first ``ready`` frames encoded (the rest zeros); with ``newline``
        every frame is encoded: prefill the rest and the newline. Otherwise prefill the frames that
        became stable, once there are enough of them (``chunk_frames``)."""
        num_frames, tokens_per_frame, dim = features.shape
        stable = num_frames if newline is not None else self.method.stable_frames(ready, num_frames)
        if newline is None and stable - self.frames_done < chunk_frames(num_frames):
            return
        visual = self.method.compress(features.reshape(-1, dim), num_frames, tokens_per_frame)
        if newline is not None and self.prefilled:
            # the chunks prefilled before every frame was known must begin the whole video's tokens
            done = torch.cat(self.prefilled) if len(self.prefilled) > 1 else self.prefilled[0]
            if not torch.equal(done, visual.tokens[: self.tokens_done]):
                return  # not complete: no prefix
        end = sum(visual.per_frame[:stable])
        new = visual.tokens[self.tokens_done : end]
        parts = [new]
        if not self.prefilled:
            ids = to_device(torch.tensor([self.text_ids]), self.loaded.device)
            parts.insert(0, self.loaded.model.get_input_embeddings()(ids)[0])
        if newline is not None:
            parts.append(newline.to(new.dtype))
        self._forward(torch.cat([p.to(new.device, new.dtype) for p in parts]).unsqueeze(0))
        self.prefilled.append(new)
        self.frames_done, self.tokens_done = stable, end
        self.complete = newline is not None

    def result(self) -> PrefixKV | None:
        """The prefix's cache once ``advance`` has seen every frame; None when the tokens prefilled
        before that are not the first tokens of the whole video's compression (a method whose
        ``stable_frames`` promised too much), or ``advance`` has not seen every frame."""
        if not self.complete:
            return None
        layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        return PrefixKV(layers=layers, length=int(self.cache.get_seq_length()))

    def _forward(self, embeds: torch.Tensor) -> None:
        """Run the language model over (1, n, D) embeddings, continuing the cache."""
        decoder = language_model_of(self.loaded.model)
        with torch.inference_mode(), without_cudnn_attention(), chunked_prefill(self.loaded.model):
            decoder(inputs_embeds=embeds, use_cache=True, **{CACHE_ARGUMENT: self.cache})
