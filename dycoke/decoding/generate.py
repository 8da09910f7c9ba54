"""Decoding with transformers' own ``generate`` (sampling, a model split over devices, any method)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from dycoke.decoding.prefix import CACHE_ARGUMENT
from dycoke.sdpa_choice import without_cudnn_attention


class _Stop(StoppingCriteria):
    """Ends every row when the caller's ``stop()`` says so (a client went away)."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


class GenerateDecoder:
    """``model.generate`` on prompt embeddings, with the method's cache (or a shared prefix in it)."""

    def __init__(self, model: Any, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.kwargs = kwargs

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        streamer: Any,
        cache: Any = None,
        stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """(B, S, D) embeddings, (B, S) mask -> (B, n) generated ids; ``streamer`` sees every token;
        ``stop()`` returning True ends generation after the current step."""
        kwargs = dict(self.kwargs)
        if cache is not None:
            kwargs[CACHE_ARGUMENT] = cache
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop(stop)])
        with without_cudnn_attention():  # every step a new key length
            return self.model.generate(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, streamer=streamer, **kwargs
            )
