"""Decoding with transformers' own ``generate`` (sampling, a model split over devices, any method)."""

from __future__ import annotations

from typing import Any

import torch

from dycoke.decoding.prefix import CACHE_ARGUMENT


class GenerateDecoder:
    """``model.generate`` on prompt embeddings, with the method's cache (or a shared prefix in it)."""

    def __init__(self, model: Any, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.kwargs = kwargs

    def generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, streamer: Any, cache: Any = None
    ) -> torch.Tensor:
        """(B, S, D) embeddings, (B, S) mask -> (B, n) generated ids; ``streamer`` sees every token."""
        kwargs = dict(self.kwargs)
        if cache is not None:
            kwargs[CACHE_ARGUMENT] = cache
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, streamer=streamer, **kwargs
        )
