"""Greedy decoding on a static KV cache, with the decode step captured once as a CUDA graph.

transformers' ``generate`` at batch 1 is bound by Python and kernel launches: a 7B decode step runs
about 7.5 ms of GPU work in 25-35 ms of wall time. Here the cache is a ``StaticCache`` (fixed shapes,
fixed addresses) and every per-step input lives in a persistent buffer (token ids, positions, cache
position, the 4D attention mask), so one decode step (embedding, the model's forward, the greedy
choice, the buffer updates) is captured as a CUDA graph on the second step and replayed for every
later one: one launch per token. DyCoke's DP state is made of device buffers updated in place
(``dycoke/compress/kv_prune.py``), so pruning runs inside the graph; its masks are fixed-shape
(over the whole static cache), which is what makes this possible.

Methods whose later layers store fewer prompt entries (FastV from prefill on, DyCoke's eviction from
the first decode step on; ``CompressionMethod.compaction``) get static layers of their own, shorter
length for those layers: each static layer fills its own slots in order, and the decode attention
maps a compacted layer's entries back to cache slots to build its bias (``DecodeSession.compacted``).
For such a method the first decode step runs eagerly, so the graph is captured once every shape is
final; otherwise the first step is captured and replayed.

Without CUDA (or with ``use_graph=False``) the same loop runs eagerly: on a CPU it is the reference
the tests compare with ``generate``. Nothing here changes the answer: the tokens are those of
``generate`` with greedy decoding (tested token for token, on the CPU and, in float32, on the GPU).
With the fused step (``fused.py``) in bf16 on a GPU the fused GEMMs may sum in another order, so a
long answer may part from ``generate``'s after a near-tie; ``fused=False`` keeps the modules' kernels.

Shapes: B rows, S prompt length (left-padded), L = S + max_new_tokens cache slots, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from dycoke.attention import DecodeSession, compacted_key_slots, static_decoding, take_slots
from dycoke.decoding.fused import fused_decoder_for
from dycoke.decoding.kernels import wait_for_compiles
from dycoke.decoding.prefix import CACHE_ARGUMENT
from dycoke.methods.base import Compaction
from dycoke.sdpa_choice import without_cudnn_attention
from dycoke.warm_answer import wait_for_warm_answer


@dataclass
class DecodeBuffers:
    """The inputs of one decode step, at fixed addresses (a captured graph reads them)."""

    token: torch.Tensor  # (B, 1) long: the token fed to this step
    position: torch.Tensor  # (B, 1) long: its rotary position
    slot: torch.Tensor  # (1,) long: its cache slot
    mask: torch.Tensor  # (B, 1, 1, L) bool: slots each row may attend to
    finished: torch.Tensor  # (B,) bool: rows that produced an end token
    generated: torch.Tensor  # () long: tokens generated so far


@dataclass
class RowGroups:
    """A batch prefilled, and its first decode step taken, ``size`` rows at a time: for a method whose
    cache that step compacts (``CompressionMethod.splits_rows``), each group's whole cache is cut down
    before the next group's is made, so the peak holds the batch's compacted cache and one group's whole
    one instead of the batch's whole cache. ``prefix(n)``: a cache holding the shared prefix for n rows
    (None without one); ``scope(start, stop)``: the method's block for rows ``start..stop``."""

    size: int
    prefix: Callable[[int], Any]
    scope: Callable[[int, int], AbstractContextManager[None]]


class _Readback:
    """One step's (B,) tokens and finished flags, copied to the host without waiting for the step."""

    @classmethod
    def of(cls, buffers: DecodeBuffers) -> _Readback:
        """The step whose tokens the buffers hold."""
        return cls(buffers.token[:, 0], buffers.finished)

    def __init__(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        self.tokens = tokens.clone()
        cuda = self.tokens.is_cuda
        self.host_tokens = self.tokens.to("cpu", non_blocking=cuda)  # pinned, filled when the step ends
        self.host_finished = finished.to("cpu", non_blocking=cuda)
        self.done: torch.cuda.Event | None = None
        if cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def deliver(self, tokens: list[torch.Tensor], on_tokens: Callable[[torch.Tensor], None] | None) -> bool:
        """Append the step's tokens and hand them to ``on_tokens`` once the step has run; False when every
        row has finished (no later step's tokens count)."""
        if self.done is not None:
            self.done.synchronize()
        tokens.append(self.tokens)
        if on_tokens is not None:
            on_tokens(self.host_tokens)
        return not bool(self.host_finished.all())


def prefill_mask(attention_mask: torch.Tensor, cache_length: int) -> torch.Tensor:
    """(B, S) padding mask -> (B, 1, S, L) boolean causal mask over the whole static cache."""
    b, s = attention_mask.shape
    slots = torch.arange(cache_length, device=attention_mask.device)
    causal = slots[None, :] <= torch.arange(s, device=attention_mask.device)[:, None]  # (S, L)
    padding = torch.zeros(b, cache_length, dtype=torch.bool, device=attention_mask.device)
    padding[:, :s] = attention_mask.bool()
    return (causal[None, None] & padding[:, None, None, :]).contiguous()


def _emptied(tensor: torch.Tensor) -> torch.Tensor:
    """A new (B, Hkv, 0, d) tensor like ``tensor``: holds no memory of it (a slice would keep it alive)."""
    b, h, _, d = tensor.shape
    return tensor.new_empty((b, h, 0, d))


def _filled_layer(keys: torch.Tensor, values: torch.Tensor, length: int) -> StaticLayer:
    """A static layer of ``length`` slots holding (B, Hkv, n, d) ``keys``/``values`` in its first n."""
    layer = StaticLayer(max_cache_len=length)
    layer.update(keys, values)
    return layer


def _batch_layer(part: Any, batch: int) -> StaticLayer:
    """An empty static layer like ``part`` (a group's) for ``batch`` rows, filled as far as ``part``."""
    _, heads, _, key_dim = part.keys.shape
    layer = StaticLayer(max_cache_len=part.max_cache_len)
    layer.lazy_initialization(
        part.keys.new_empty((batch, heads, 0, key_dim)), part.values.new_empty((batch, heads, 0, part.values.shape[-1]))
    )
    layer.cumulative_length.copy_(part.cumulative_length)
    return layer


class StaticGreedyDecoder:
    """Greedy generation for one batch of prompt embeddings on a static cache.

    ``fused``: each decode step runs ``FusedStep`` (fused projections and kernels) when the model is
    one it implements, else the model's own forward.

    ``eager_first_step``: run the first decode step outside the graph, for a method that may compact
    its layers after it (the graph is then captured on the final shapes). Otherwise the graph is
    captured at the first step: an eager step costs 14-23 ms of Python launches on a 7B model (H200),
    where a replay takes about 4.5 ms.

    ``eos_ids`` end a row (it then emits ``pad_id``, as ``generate`` does); ``min_new_tokens``
    suppresses the end tokens until that many tokens exist, as ``generate``'s processor does.
    """

    cache: StaticCache  # set by the prefill

    def __init__(
        self,
        model: Any,
        *,
        max_new_tokens: int,
        min_new_tokens: int,
        eos_ids: list[int],
        pad_id: int,
        use_graph: bool,
        fused: bool = True,
        eager_first_step: bool = True,
    ) -> None:
        self.model = model
        self.fused = fused_decoder_for(model) if fused else None
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.pad_id = pad_id
        self.use_graph = use_graph
        self.eager_first_step = eager_first_step
        self.eos_ids = eos_ids
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: DecodeBuffers | None = None
        self.session = DecodeSession()
        self.compacted_from: int | None = None

    def generate(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        prefix: Any = None,
        compaction: Callable[[], Compaction | None] | None = None,
        stop: Callable[[], bool] | None = None,
        groups: RowGroups | None = None,
    ) -> torch.Tensor:
        """(B, S, D) embeddings and (B, S) padding mask -> (B, n) generated ids (n <= max_new_tokens).

        ``prefix``: a dynamic cache to prefill into (a method's own, e.g. FastV's), possibly already
        holding the first P slots of every row (a shared prefix); only the rest is prefilled, and the
        embeddings may be those of the rest only, (B, S - P, D).
        ``compaction``: asked after prefill and after the first decode step which later layers store
        fewer prompt entries. ``on_tokens`` receives each step's (B,) tokens on the host. ``stop()``
        returning True ends generation within a step (the host reads each step's tokens
        while the next one runs). ``groups``: prefill and take the first step in groups of rows
        (``RowGroups``, which then brings the prefix; ``dycoke.decoding.decode`` gives them to a batch of
        more rows than a group), for an answer of two tokens or more; the tokens are the same.
        """
        if groups is not None and self.max_new_tokens < 2:
            raise ValueError("row groups take the first decode step: max_new_tokens must be at least 2")
        model = self.model
        s = attention_mask.shape[1]
        device = inputs_embeds.device
        length = s + self.max_new_tokens
        self.length, self.prompt_length = length, s
        self.session.prompt_length = s
        self.eos = torch.tensor(self.eos_ids, device=device)
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        with static_decoding(model, self.session):  # decode_attention from the prefill on
            if groups is not None:
                first = self._prefill_in_groups(inputs_embeds, attention_mask, positions, groups, compaction)
                return self._decode(on_tokens, stop, compaction, first=first)
            self._prefill(inputs_embeds, attention_mask, positions, prefix, compaction)
            return self._decode(on_tokens, stop, compaction)

    def _prefill_in_groups(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        groups: RowGroups,
        compaction: Callable[[], Compaction | None] | None,
    ) -> _Readback:
        """Prefill and take the first decode step ``groups.size`` rows at a time, each group's cache
        compacted and copied into the batch's before the next group starts. Leaves the batch's cache and
        buffers as one first step of the whole batch would; returns the prefill's tokens (the first step's
        are in the buffers)."""
        b = int(attention_mask.shape[0])
        cache: StaticCache | None = None
        batch: DecodeBuffers | None = None
        first_tokens = torch.empty(b, dtype=torch.long, device=inputs_embeds.device)
        first_finished = torch.empty(b, dtype=torch.bool, device=inputs_embeds.device)
        for start in range(0, b, groups.size):
            rows = slice(start, min(start + groups.size, b))
            self.compacted_from, self.session.compacted = None, None
            with groups.scope(rows.start, rows.stop):
                part = groups.prefix(rows.stop - rows.start)
                self._prefill(inputs_embeds[rows], attention_mask[rows], positions[rows], part, compaction)
                del part
                own = self.buffers
                assert own is not None
                first_tokens[rows], first_finished[rows] = own.token[:, 0], own.finished
                self._forward_step()
                self._compact(compaction, filled=True)
            if cache is None:
                cache = StaticCache(config=self.model.config, max_cache_len=self.length)
                cache.layers = [_batch_layer(layer, b) for layer in self.cache.layers]
                batch = DecodeBuffers(
                    token=own.token.new_empty((b, 1)),
                    position=own.position.new_empty((b, 1)),
                    slot=own.slot,
                    mask=own.mask.new_empty((b, *own.mask.shape[1:])),
                    finished=own.finished.new_empty(b),
                    generated=own.generated,
                )
            assert batch is not None
            whole_layers: list[Any] = cache.layers
            part_layers: list[Any] = self.cache.layers
            for whole, layer in zip(whole_layers, part_layers, strict=True):
                whole.keys[rows], whole.values[rows] = layer.keys, layer.values
            for name in ("token", "position", "mask", "finished"):
                getattr(batch, name)[rows] = getattr(own, name)
            del self.cache  # this group's whole cache, before the next group's is made
        assert cache is not None and batch is not None
        self.cache, self.buffers = cache, batch
        self.compacted_from = None
        plan = compaction() if compaction is not None else None
        if plan is not None:  # the batch's slots (the method gathered every group's)
            self._note_compaction(plan)
        return _Readback(first_tokens, first_finished)

    def _prefill(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        prefix: Any,
        compaction: Callable[[], Compaction | None] | None,
    ) -> None:
        """Fill the static cache from the prompt; the first token into the buffers."""
        model, device = self.model, inputs_embeds.device
        (b, s), length = attention_mask.shape, self.length
        # Prefill as ``generate`` does (dynamic cache, the model's own masks and fused kernels; a masked
        # batch continuing a shared prefix attends through ``continuation_attention``, the same sums
        # without the repeated K/V heads), then move the keys and values into the static cache.
        done = prefix.get_seq_length() if prefix is not None else 0
        extra = {CACHE_ARGUMENT: prefix} if prefix is not None else {}
        rest = inputs_embeds if inputs_embeds.shape[1] == s - done else inputs_embeds[:, done:]
        with without_cudnn_attention():  # a new prompt length each question: no per-shape plans
            out = model(
                inputs_embeds=rest,
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
            if layer.keys.shape[2] == s:
                cache.update(layer.keys, layer.values, index)
            else:  # a layer the method compacted at prefill: its own, shorter static layer
                cache.layers[index] = _filled_layer(layer.keys, layer.values, length - s + layer.keys.shape[2])
            # this call's own dynamic copy (a shared prefix was copied into it): freed layer by layer, so the
            # prompt's keys and values are held about once, not twice (the static layers are the larger)
            layer.keys, layer.values = _emptied(layer.keys), _emptied(layer.values)
        first_logits = out.logits[:, -1]
        del out, prefilled  # the dynamic copy of the prompt's keys and values
        self.cache = cache
        self._compact(compaction, filled=False)
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
        self.buffers = buffers
        self._choose(first_logits)

    def _decode(
        self,
        on_tokens: Callable[[torch.Tensor], None] | None,
        stop: Callable[[], bool] | None,
        compaction: Callable[[], Compaction | None] | None,
        first: _Readback | None = None,
    ) -> torch.Tensor:
        """Every later step, until each row ended or ``max_new_tokens``; (B, n) generated ids. ``first``:
        the prefill's tokens when the first decode step has run already (its tokens in the buffers)."""
        buffers = self.buffers
        assert buffers is not None
        tokens: list[torch.Tensor] = []
        pending: _Readback | None = _Readback.of(buffers)
        if first is not None and not first.deliver(tokens, on_tokens):
            return torch.stack(tokens, dim=1)  # every row ended at the prefill's token: step 1 is dropped
        for step in range(1 if first is None else 2, self.max_new_tokens):
            # The host reads step k - 1's token while the GPU runs step k: waiting for each step before
            # launching the next left the GPU idle during the host's work (streaming, the checks),
            # about 0.7 ms a token for a 7B model on an H200. Step k launches before the host knows
            # whether step k - 1 finished every row; it is then dropped, as if never run.
            if stop is not None and stop():
                break
            self._step(first=step == 1)
            if step == 1:
                self._compact(compaction, filled=True)
            previous, pending = pending, _Readback.of(buffers)
            if previous is not None and not previous.deliver(tokens, on_tokens):
                pending = None
                break
        if pending is not None:
            pending.deliver(tokens, on_tokens)
        return torch.stack(tokens, dim=1)

    def _compact(self, compaction: Callable[[], Compaction | None] | None, *, filled: bool) -> None:
        """Give the layers a method compacted their own static layers (once), and the decode attention
        the cache slots their entries stand for. ``filled``: the full layers hold the prompt and the
        first decode step's token, and are cut down here (eviction); otherwise prefill already did it."""
        plan = compaction() if compaction is not None else None
        if plan is None or self.compacted_from is not None:
            return
        compacted_length, slots = self._note_compaction(plan)
        if filled:
            index = slots[:, : plan.slots.shape[1] + 1]  # the survivors, then the first decode token
            for layer_idx in range(plan.first_layer, len(self.cache.layers)):
                layer: Any = self.cache.layers[layer_idx]
                keys, values = take_slots(layer.keys, index), take_slots(layer.values, index)
                self.cache.layers[layer_idx] = _filled_layer(keys, values, compacted_length)

    def _note_compaction(self, plan: Compaction) -> tuple[int, torch.Tensor]:
        """Tell the decode attention which cache slots a compacted layer's entries stand for; returns the
        compacted layers' length and those (B, length) slots."""
        s, length = self.prompt_length, self.length
        compacted_length = plan.slots.shape[1] + length - s
        slots = self.session.compacted = compacted_key_slots(plan.slots, s, compacted_length)
        self.compacted_from = plan.first_layer
        return compacted_length, slots

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
        if self.fused is not None:
            self._choose(self.fused.logits(buffers.token, buffers.position, buffers.mask, self.cache))
            return
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
        if not self.use_graph or (first and self.eager_first_step):  # lets a method compact its layers
            self._forward_step()  # after the first step, before the capture
            return
        if self.graph is None:
            # no other thread may use the GPU during a capture: a warm answer (dycoke.warm_answer) and the
            # kernels' compile thread (whose first compile on a machine can outlast the prefill) end first
            wait_for_warm_answer()
            wait_for_compiles()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the step's kernels without running them
                self._forward_step()
        self.graph.replay()
