"""Greedy decoding on a static KV cache, with the decode step captured once as a CUDA graph.

transformers' ``generate`` at batch 1 is bound by Python and kernel launches: a 7B decode step runs
about 7.5 ms of GPU work in 25-35 ms of wall time. Here the cache is a ``StaticCache`` (fixed shapes,
fixed addresses) and every per-step input lives in a persistent buffer (token ids, positions, cache
position, the 4D attention mask), so one decode step (embedding, the model's forward, the greedy
choice, the buffer updates) is captured as a CUDA graph on the first step and replayed for every later
one: one launch per token. DyCoke's DP state is made of device buffers updated in place
(``dycoke/compress/kv_prune.py``), so pruning runs inside the graph; its masks are fixed-shape
(over the whole static cache), which is what makes this possible.

Without CUDA (or with ``use_graph=False``) the same loop runs eagerly: on a CPU it is the reference
the tests compare with ``generate``. Nothing here changes the answer: the tokens are those of
``generate`` with greedy decoding (tested token for token).

Shapes: B rows, S prompt length (left-padded), L = S + max_new_tokens cache slots, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StaticCache

from dycoke.hooks import static_decoding
from dycoke.prefix_cache import CACHE_ARGUMENT


@dataclass
class DecodeBuffers:
    """The inputs of one decode step, at fixed addresses (a captured graph reads them)."""

    token: torch.Tensor  # (B, 1) long: the token fed to this step
    position: torch.Tensor  # (B, 1) long: its rotary position
    slot: torch.Tensor  # (1,) long: its cache slot
    mask: torch.Tensor  # (B, 1, 1, L) bool: slots each row may attend to
    finished: torch.Tensor  # (B,) bool: rows that produced an end token
    generated: torch.Tensor  # () long: tokens generated so far


def prefill_mask(attention_mask: torch.Tensor, cache_length: int) -> torch.Tensor:
    """(B, S) padding mask -> (B, 1, S, L) boolean causal mask over the whole static cache."""
    b, s = attention_mask.shape
    slots = torch.arange(cache_length, device=attention_mask.device)
    causal = slots[None, :] <= torch.arange(s, device=attention_mask.device)[:, None]  # (S, L)
    padding = torch.zeros(b, cache_length, dtype=torch.bool, device=attention_mask.device)
    padding[:, :s] = attention_mask.bool()
    return (causal[None, None] & padding[:, None, None, :]).contiguous()


class StaticGreedyDecoder:
    """Greedy generation for one batch of prompt embeddings on a static cache.

    ``eos_ids`` end a row (it then emits ``pad_id``, as ``generate`` does); ``min_new_tokens``
    suppresses the end tokens until that many tokens exist, as ``generate``'s processor does.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_new_tokens: int,
        min_new_tokens: int,
        eos_ids: list[int],
        pad_id: int,
        use_graph: bool,
    ) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.pad_id = pad_id
        self.use_graph = use_graph
        self.eos_ids = eos_ids
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: DecodeBuffers | None = None

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        prefix: Any = None,
    ) -> torch.Tensor:
        """(B, S, D) embeddings and (B, S) padding mask -> (B, n) generated ids (n <= max_new_tokens).

        ``prefix``: a dynamic cache already holding the first P slots of every row (a shared prefix);
        only the rest is prefilled. ``on_tokens`` receives each step's (B,) tokens on the host.
        """
        model = self.model
        b, s = attention_mask.shape
        device = inputs_embeds.device
        length = s + self.max_new_tokens
        self.eos = torch.tensor(self.eos_ids, device=device)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        # Prefill exactly as ``generate`` does (dynamic cache, the model's own masks and fused kernels),
        # then move the keys and values into the static cache.
        done = prefix.get_seq_length() if prefix is not None else 0
        extra = {CACHE_ARGUMENT: prefix} if prefix is not None else {}
        out = model(
            inputs_embeds=inputs_embeds[:, done:],
            attention_mask=attention_mask,
            position_ids=positions[:, done:],
            cache_position=torch.arange(done, s, device=device),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        cache = StaticCache(config=model.config, max_cache_len=length)
        prefilled = getattr(out, CACHE_ARGUMENT)
        for index, layer in enumerate(prefilled.layers):
            cache.update(layer.keys, layer.values, index)
        first_logits = out.logits[:, -1]
        del out, prefilled  # the dynamic copy of the prompt's keys and values
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=device)
        mask[:, 0, 0, :s] = attention_mask.bool()
        buffers = DecodeBuffers(
            token=torch.zeros(b, 1, dtype=torch.long, device=device),
            position=positions[:, -1:].clone(),
            slot=torch.full((1,), s - 1, dtype=torch.long, device=device),
            mask=mask,
            finished=torch.zeros(b, dtype=torch.bool, device=device),
            generated=torch.zeros((), dtype=torch.long, device=device),
        )
        self.buffers, self.cache = buffers, cache
        self._choose(first_logits)
        tokens = [buffers.token[:, 0].clone()]
        if on_tokens is not None:
            on_tokens(tokens[-1].cpu())
        with static_decoding(model):
            for step in range(1, self.max_new_tokens):
                if bool(buffers.finished.all()):
                    break
                self._step(first=step == 1)
                tokens.append(buffers.token[:, 0].clone())
                if on_tokens is not None:
                    on_tokens(tokens[-1].cpu())
        return torch.stack(tokens, dim=1)

    def _choose(self, logits: torch.Tensor) -> None:
        """Greedy choice from (B, V) logits into the token buffer; end tokens wait for min_new_tokens."""
        buffers = self.buffers
        assert buffers is not None
        scores = logits.float()
        if self.min_new_tokens > 0:
            early = buffers.generated < self.min_new_tokens
            blocked = torch.zeros_like(scores[0], dtype=torch.bool).index_fill_(0, self.eos, True)
            scores = scores.masked_fill(blocked & early, float("-inf"))
        chosen = scores.argmax(dim=-1)
        chosen = torch.where(buffers.finished, torch.full_like(chosen, self.pad_id), chosen)
        buffers.finished.logical_or_(torch.isin(chosen, self.eos))
        buffers.token.copy_(chosen.unsqueeze(1))
        buffers.generated.add_(1)

    def _forward_step(self) -> None:
        """One decode step on the buffers: attend, choose, advance (capturable: no host sync)."""
        buffers = self.buffers
        assert buffers is not None
        buffers.position.add_(1)
        buffers.slot.add_(1)
        buffers.mask.index_fill_(3, buffers.slot, True)
        embeds = self.model.get_input_embeddings()(buffers.token)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=buffers.mask,
            position_ids=buffers.position,
            cache_position=buffers.slot,
            use_cache=True,
            **{CACHE_ARGUMENT: self.cache},
        )
        self._choose(out.logits[:, -1])

    def _step(self, first: bool) -> None:
        if not self.use_graph:
            self._forward_step()
            return
        if self.graph is None:
            if first:  # run the first step eagerly: it warms up every kernel before the capture
                self._forward_step()
                return
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the step's kernels without running them
                self._forward_step()
        self.graph.replay()
