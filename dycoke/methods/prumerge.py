"""LLaVA-PruMerge(+) adapted to SigLIP and LLaVA-OneVision's pooled video tokens, and the vision probe
that records what it selects by (the attention each patch receives in the selected vision layer)."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dycoke.attention import attention_scaling, installed_attention, register_attention
from dycoke.errors import ConfigError
from dycoke.methods.base import CompressedVisual, TokensOnly, VisionSignals, register_method


@register_method("prumerge")
class PruMerge(TokensOnly):
    """LLaVA-PruMerge (+): per frame, the tokens whose vision-tower attention is an IQR outlier are kept
    and the others merged into them by key similarity (``dycoke/compress/prumerge.py``).

    Adaptation to SigLIP (no class token) and LLaVA-OneVision's pooled video tokens: the "class
    attention" is the attention each patch receives, averaged over heads and patch queries, in the vision
    layer that produces the selected features; scores and keys are pooled to the 14x14 grid with the
    model's own bilinear pooling, and selection and merging act on the projected, pooled tokens the LLM
    receives (the reference merges CLIP features before the projector).
    """

    name = "prumerge"
    needs_vision_signals = True

    def compress(
        self, features: torch.Tensor, num_frames: int, tokens_per_frame: int, vision: VisionSignals | None = None
    ) -> CompressedVisual:
        if vision is None:
            raise ConfigError("prumerge needs the vision tower's attention: prepare the video with it")
        from dycoke.compress.prumerge import prumerge

        t = tokens_per_frame
        result = prumerge(
            features.reshape(num_frames, t, -1),
            vision.scores.to(features.device),
            vision.keys.to(features.device),
            plus=self.options.prumerge_plus,
        )
        self.figures = {"prumerge_plus": self.options.prumerge_plus, "iqr_outlier_ratio": result.ratio}
        return CompressedVisual(
            tokens=result.tokens,
            per_frame=list(result.tokens_per_frame),
            frame_index=result.frame_index,
            patch_index=result.patch_index,
        )


# -- the vision probe: what the selected vision layer attends to -----------------------------------

VISION_PROBE_ATTENTION = "dycoke_vision_probe"


@dataclass
class VisionProbe:
    """Captures, for one vision layer, the attention each patch receives and the layer's keys."""

    target: torch.nn.Module
    scores: torch.Tensor | None = None  # (F, N) mean over heads and queries
    keys: torch.Tensor | None = None  # (F, N, H*d)


_PROBE: contextvars.ContextVar[VisionProbe | None] = contextvars.ContextVar("dycoke_probe", default=None)


def vision_probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA attention that also records the probe's layer: probabilities one frame at a time, so that
    at most one (H, N, N) matrix exists at once. Shapes: query/key/value (F, H, N, d)."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    probe = _PROBE.get()
    if probe is not None and module is probe.target:
        scaling = attention_scaling(query, kwargs)
        received = []
        for frame in range(query.shape[0]):
            logits = torch.matmul(query[frame].float(), key[frame].float().transpose(-1, -2)) * scaling
            received.append(logits.softmax(dim=-1).mean(dim=(0, 1)))
        probe.scores = torch.stack(received)
        probe.keys = key.transpose(1, 2).reshape(key.shape[0], key.shape[2], -1)
    return out


register_attention(VISION_PROBE_ATTENTION, vision_probe_attention)


@contextmanager
def vision_probe(model: Any) -> Iterator[VisionProbe]:
    """Record the attention of the vision layer whose output LLaVA-OneVision selects
    (``vision_feature_layer``, the last one in the released checkpoints) during the block."""
    config = model.config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"PruMerge needs one vision_feature_layer, the checkpoint selects {layer}")
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers  # 5.17 | 5.2x
    # hidden_states[i] is the output of layer i - 1 (hidden_states[0] is the embeddings)
    index = layer - 1 if layer > 0 else len(layers) + layer
    probe = VisionProbe(target=layers[index].self_attn)
    with installed_attention(tower, VISION_PROBE_ATTENTION, _PROBE, probe, "PruMerge's probe"):
        yield probe
