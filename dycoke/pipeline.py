"""The story top to bottom: frames -> pixels -> features -> compression -> generation -> report.

``VideoQA.load(...)`` loads a checkpoint once; ``ask`` answers one question about one video.
``prepare`` (decode, preprocess, encode) and ``answer`` (compress, prompt, generate) are separate so
that several questions or methods can share one decoded and encoded video.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dycoke.config import ModelOptions, RunOptions, VideoOptions, needs_vision_signals
from dycoke.costs import LlmShape, dycoke_tflops, fastv_tflops, full_tflops
from dycoke.errors import ConfigError, OutOfMemoryError
from dycoke.hooks import vision_probe
from dycoke.methods import CompressedVisual, CompressionMethod, VisionSignals, build_method
from dycoke.model import LoadedModel, load_model
from dycoke.prefix_cache import (
    CACHE_ARGUMENT,
    PrefixKV,
    common_prefix_ok,
    expand_prefix,
    pad_rows,
    prefill_prefix,
    trim_generated,
)
from dycoke.preprocess import preprocess_frames
from dycoke.prompt import expand_video_placeholder, render_prompt, tokenize_prompt
from dycoke.report import Memory, Report, Timings, TokenCounts, VideoInfo, kv_cache_bytes
from dycoke.static_decode import StaticGreedyDecoder
from dycoke.streaming import TimedTextStreamer
from dycoke.trace import build_trace
from dycoke.video import VideoFrames, read_video

TextCallback = Callable[[str], None]


@dataclass
class PreparedVideo:
    """A decoded, preprocessed and encoded video, ready for any number of questions.

    ``features`` is (F*T, D): the projected and pooled tokens of the F frames, frame after frame,
    without the trailing newline token, which is ``newline`` (1, D).
    """

    frames: VideoFrames
    path: str
    features: torch.Tensor
    newline: torch.Tensor
    num_frames: int
    tokens_per_frame: int
    decode_s: float
    preprocess_s: float
    encode_s: float
    pixels: torch.Tensor  # (F, 3, H, W) on the model's device
    vision: VisionSignals | None = None


@dataclass
class DecodedVideo:
    """Frames sampled from a video file, and how long decoding took."""

    frames: VideoFrames
    path: str
    decode_s: float


def decode_video(video: str | Path, options: VideoOptions | None = None) -> DecodedVideo:
    """Sample and decode frames (no model needed: bad files are reported before any model loads)."""
    options = options or VideoOptions()
    t0 = time.perf_counter()
    frames = read_video(
        video,
        num_frames=options.num_frames,
        fps=options.fps,
        max_frames=options.max_frames,
        start_s=options.start_s,
        end_s=options.end_s,
    )
    return DecodedVideo(frames=frames, path=str(video), decode_s=time.perf_counter() - t0)


class VideoQA:
    """Answers questions about videos with a loaded LLaVA-OneVision checkpoint."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    @classmethod
    def load(cls, options: ModelOptions | None = None) -> VideoQA:
        """Load a checkpoint (hub id or local directory) with the given device/dtype options."""
        return cls(load_model(options or ModelOptions()))

    # -- stages -------------------------------------------------------------------------------------

    def prepare(
        self, video: str | Path | DecodedVideo, options: VideoOptions | None = None, *, with_signals: bool = False
    ) -> PreparedVideo:
        """Decode and sample frames (unless ``video`` is already decoded), preprocess them on the model's
        device, run the vision encoder (``with_signals``: also record what PruMerge selects by; a method
        that needs it and finds it missing runs the encoder again)."""
        decoded = video if isinstance(video, DecodedVideo) else decode_video(video, options)
        frames = decoded.frames
        loaded = self.loaded
        t1 = time.perf_counter()
        with _oom_guard("preprocessing", frames.num_frames):
            pixels = preprocess_frames(frames.frames, loaded.preprocess, device=loaded.device, dtype=loaded.dtype)
            _sync(loaded.device)
        t2 = time.perf_counter()
        with _oom_guard("the vision encoder", frames.num_frames), torch.inference_mode():
            features, newline, vision = self._encode(pixels, with_signals=with_signals)
            _sync(loaded.device)
        t3 = time.perf_counter()
        return PreparedVideo(
            frames=frames,
            path=decoded.path,
            features=features,
            newline=newline,
            num_frames=frames.num_frames,
            tokens_per_frame=loaded.tokens_per_frame,
            decode_s=decoded.decode_s,
            preprocess_s=t2 - t1,
            encode_s=t3 - t2,
            pixels=pixels,
            vision=vision,
        )

    def _encode(
        self, pixels: torch.Tensor, *, with_signals: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, VisionSignals | None]:
        """(F, 3, H, W) pixels -> ((F*T, D) frame tokens, (1, D) newline token, PruMerge's signals).

        transformers >= 5.2x appends the newline token to ``get_video_features``' output; older 5.x
        releases return the frame tokens alone and add ``image_newline`` in ``forward``.
        """
        model = self.loaded.model
        config = model.config
        with vision_probe(model) if with_signals else nullcontext() as probe:
            out = model.get_video_features(
                pixels.unsqueeze(0),  # named pixel_values_videos in 5.2x, pixel_values in 5.17: pass by position
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        tokens = out.pooler_output if hasattr(out, "pooler_output") else out
        tokens = tokens.reshape(-1, tokens.shape[-1])
        frame_tokens = pixels.shape[0] * self.loaded.tokens_per_frame
        signals = None
        if probe is not None:
            assert probe.scores is not None and probe.keys is not None
            pool = model.model.apply_pooling  # the model's own video pooling (bilinear, 27x27 -> 14x14)
            signals = VisionSignals(
                scores=pool(probe.scores.float().unsqueeze(-1)).squeeze(-1), keys=pool(probe.keys.float())
            )
        if tokens.shape[0] == frame_tokens + 1:
            return tokens[:-1], tokens[-1:], signals
        newline = model.model.image_newline.reshape(1, -1).to(tokens.device, tokens.dtype)
        return tokens, newline, signals

    def answer(
        self,
        prepared: PreparedVideo,
        question: str,
        options: RunOptions | None = None,
        on_text: TextCallback | None = None,
        *,
        record: bool = False,
    ) -> Report:
        """Compress the prepared video's tokens, build the prompt, generate, and report."""
        return self.answer_many(prepared, [question], options, share_prefix=False, on_text=on_text, record=record)[0]

    def answer_many(
        self,
        prepared: PreparedVideo,
        questions: list[str],
        options: RunOptions | None = None,
        *,
        batch_size: int = 1,
        share_prefix: bool = True,
        on_text: TextCallback | None = None,
        on_reports: Callable[[list[Report]], None] | None = None,
        record: bool = False,
    ) -> list[Report]:
        """Answer several questions about one prepared video, compressing its tokens once.

        With ``share_prefix`` the system prompt and video tokens are prefilled once and every question
        continues from that KV cache (``dycoke/prefix_cache.py``); ``batch_size`` questions generate
        together (left padding, a mask and a DyCoke keep set per row). Answers equal those of
        answering each question alone, up to floating-point summation order. ``on_reports`` receives
        each batch's reports as soon as it completes; ``on_text`` streams (one question only).
        ``record`` keeps what the method kept in ``Report.trace`` (for ``dycoke.visualize``).
        """
        options = options or RunOptions()
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        if on_text is not None and len(questions) != 1:
            raise ConfigError("streaming (on_text) answers one question at a time")
        loaded = self.loaded
        method = build_method(options.method, loaded)
        method.record = record
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)

        t_start = time.perf_counter()
        with _oom_guard("compression", prepared.num_frames), torch.inference_mode():
            if method.needs_vision_signals and prepared.vision is None:
                prepared.vision = self._encode(prepared.pixels, with_signals=True)[2]  # timed as compression
            visual: CompressedVisual = method.compress(
                prepared.features, prepared.num_frames, prepared.tokens_per_frame, prepared.vision
            )
            visual_tokens = torch.cat([visual.tokens, prepared.newline.to(visual.tokens.dtype)], dim=0)
            _sync(loaded.device)
        compress_s = time.perf_counter() - t_start
        num_visual = int(visual_tokens.shape[0])

        rows, visual_start = [], 0
        for question in questions:
            text = render_prompt(loaded.tokenizer, question, options.prompt)
            ids, visual_start = expand_video_placeholder(
                tokenize_prompt(loaded.tokenizer, text), loaded.video_token_id, num_visual
            )
            rows.append(ids)
        prefix_length = visual_start + num_visual if share_prefix and method.shares_prefix else 0
        if prefix_length and not common_prefix_ok(rows, prefix_length):
            prefix_length = 0  # a template that puts text before the video per question: nothing to share

        prefix, prefix_s = None, 0.0
        if prefix_length:
            t0 = time.perf_counter()
            with _oom_guard("prefill", prepared.num_frames), torch.inference_mode():
                prefix_ids = torch.tensor([rows[0][:prefix_length]], device=loaded.device)
                prefix = prefill_prefix(loaded.model, self._embed(prefix_ids, visual_tokens))
                _sync(loaded.device)
            prefix_s = time.perf_counter() - t0

        reports: list[Report] = []
        for first in range(0, len(questions), batch_size):
            chunk = list(range(first, min(first + batch_size, len(questions))))
            generated, timing = self._generate_rows(
                [rows[i] for i in chunk], visual_start, num_visual, visual_tokens, prefix, method, options, on_text
            )
            batch_reports = []
            for sample, (index, tokens_out) in enumerate(zip(chunk, generated, strict=True)):
                timings = self._timings(prepared, compress_s, prefix_s, timing, len(tokens_out))
                report = self._report(
                    prepared, questions[index], options, method, visual, rows[index], tokens_out, timings, sample
                )
                if record:
                    report.trace = build_trace(
                        method, visual, prepared.frames.frames, prepared.tokens_per_frame, sample, len(tokens_out)
                    )
                batch_reports.append(report)
            if on_reports is not None:
                on_reports(batch_reports)
            reports.extend(batch_reports)
        return reports

    def _embed(self, ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, D) embeddings with each row's video placeholders replaced, in order."""
        model = self.loaded.model
        embeds = model.get_input_embeddings()(ids)
        mask = (ids == self.loaded.video_token_id).unsqueeze(-1)
        rows_with_video = int(mask.any(dim=1).sum())
        source = visual_tokens.to(embeds.dtype).repeat(rows_with_video, 1)
        return embeds.masked_scatter(mask, source)

    def _generate_rows(
        self,
        rows: list[list[int]],
        visual_start: int,
        num_visual: int,
        visual_tokens: torch.Tensor,
        prefix: PrefixKV | None,
        method: CompressionMethod,
        options: RunOptions,
        on_text: TextCallback | None,
    ) -> tuple[list[list[int]], dict[str, float]]:
        """Generate for a batch of prompts (one ``generate`` call); the generated ids of each row."""
        loaded = self.loaded
        gen = options.generation
        kwargs = generation_kwargs(loaded, gen)
        padded = pad_rows(rows, visual_start, prefix.length if prefix else 0, kwargs["pad_token_id"])
        streamer = TimedTextStreamer(loaded.tokenizer, on_text)
        decoder = choose_decoder(gen, loaded, method)
        t0 = time.perf_counter()
        with _oom_guard("generation", len(rows)), torch.inference_mode():
            ids = padded.ids.to(loaded.device)
            mask = padded.attention_mask.to(loaded.device)
            embeds = self._embed(ids, visual_tokens)
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            streamer.start()
            starts: int | list[int] = padded.visual_starts[0] if len(rows) == 1 else padded.visual_starts
            with method.decoding(visual_start=starts, num_visual=num_visual, max_steps=gen.max_new_tokens) as extra:
                if decoder == "hf":
                    kwargs.update(extra or {})
                    if prefix is not None:  # into the method's own cache when it brings one
                        kwargs[CACHE_ARGUMENT] = expand_prefix(prefix, len(rows), into=kwargs.get(CACHE_ARGUMENT))
                    output = loaded.model.generate(
                        inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **kwargs
                    )
                else:
                    static = StaticGreedyDecoder(
                        loaded.model,
                        max_new_tokens=gen.max_new_tokens,
                        min_new_tokens=gen.min_new_tokens,
                        eos_ids=kwargs["eos_token_id"],
                        pad_id=kwargs["pad_token_id"],
                        use_graph=decoder == "graph",
                    )
                    streamer.put(None)  # the prompt, which the streamer skips
                    prefix_cache = expand_prefix(prefix, len(rows)) if prefix is not None else None
                    output = static.generate(embeds, mask, on_tokens=streamer.put, prefix=prefix_cache)
                    streamer.end()
        t_end = time.perf_counter()
        generated = [trim_generated(row, kwargs["eos_token_id"]) for row in output.tolist()]
        first = streamer.first_token_s if streamer.first_token_s is not None else t_end - t0
        return generated, {
            "prefill": first,
            "decode": streamer.decode_s,
            "steps": len(streamer.times) / len(rows),
            "total": t_end - t0,
        }

    @staticmethod
    def _timings(
        prepared: PreparedVideo, compress_s: float, prefix_s: float, timing: dict[str, float], n_gen: int
    ) -> Timings:
        """Per-question timings; stages shared by several questions count in full for each."""
        shared = prepared.decode_s + prepared.preprocess_s + prepared.encode_s + compress_s + prefix_s
        steps = timing["steps"]
        return Timings(
            video_decode=prepared.decode_s,
            preprocess=prepared.preprocess_s,
            vision_encoder=prepared.encode_s,
            compress=compress_s,
            shared_prefix=prefix_s,
            prefill=timing["prefill"],
            ttft=shared + timing["prefill"],
            decode=timing["decode"],
            ms_per_token=1000 * timing["decode"] / (steps - 1) if steps > 1 and n_gen > 1 else None,
            total=shared + timing["total"],
        )

    def _report(
        self,
        prepared: PreparedVideo,
        question: str,
        options: RunOptions,
        method: CompressionMethod,
        visual: CompressedVisual,
        ids: list[int],
        generated: list[int],
        timings: Timings,
        sample: int,
    ) -> Report:
        loaded = self.loaded
        n_gen = len(generated)
        tpf = prepared.tokens_per_frame
        tokens = TokenCounts(
            frames=prepared.num_frames,
            tokens_per_frame=tpf,
            visual_per_frame=visual.per_frame,
            visual=sum(visual.per_frame) + 1,
            visual_uncompressed=prepared.num_frames * tpf + 1,
            prompt=len(ids),
            generated=n_gen,
        )
        element = torch.finfo(loaded.dtype).bits // 8
        memory = Memory(
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            peak_gpu_bytes=torch.cuda.max_memory_allocated(loaded.device) if loaded.device.type == "cuda" else None,
            kv_cache_bytes=stored_kv_bytes(method, loaded.text_config, len(ids) + max(n_gen - 1, 0), element),
        )
        frames = prepared.frames
        return Report(
            answer=loaded.tokenizer.decode(generated, skip_special_tokens=True).strip(),
            method=options.method.method,
            model=loaded.source,
            random_weights=loaded.random_weights,
            question=question,
            video=VideoInfo(
                path=prepared.path,
                source_fps=frames.source_fps,
                source_num_frames=frames.source_num_frames,
                duration_s=frames.duration_s,
                source_size=frames.source_size,
                decoded_size=frames.decoded_size,
                indices=list(frames.indices),
                timestamps_s=list(frames.timestamps_s),
                warnings=list(frames.warnings),
            ),
            tokens=tokens,
            timings_s=timings,
            memory=memory,
            options={
                "video": asdict(options.video),
                "generation": asdict(options.generation),
                "prompt": asdict(options.prompt),
                "method": asdict(options.method),
            },
            compression=self._compression_figures(method, options, tokens, memory, sample),
            token_ids=generated,
        )

    def _compression_figures(
        self, method: CompressionMethod, options: RunOptions, tokens: TokenCounts, memory: Memory, sample: int = 0
    ) -> dict[str, Any]:
        """Retained ratios, the paper's TFLOPs for this run vs full, KV bytes stored vs attended."""
        text = self.loaded.text_config
        shape = LlmShape(
            layers=int(text.num_hidden_layers), hidden=int(text.hidden_size), ffn=int(text.intermediate_size)
        )
        n_full = tokens.frames * tokens.tokens_per_frame
        merged = tokens.visual - 1
        figures = method.stats(tokens.generated, sample)
        figures["retained_prefill_ratio"] = merged / n_full if n_full else 1.0
        figures["tflops_full"] = full_tflops(shape, n_full, tokens.generated)
        prune_layer, prune_ratio = shape.layers, 0.0
        if options.method.method == "dycoke" and figures.get("decode_steps", 0) > 0:
            prune_layer, prune_ratio = options.method.prune_layer, options.method.prune_ratio
        if options.method.method == "fastv":
            kept = min(figures["visual_kept_late_layers"], merged)
            figures["tflops"] = fastv_tflops(shape, merged, kept, tokens.generated, options.method.fastv_layer)
        else:
            figures["tflops"] = dycoke_tflops(shape, merged, tokens.generated, prune_layer, prune_ratio)
        hidden_per_step = figures.get("candidates", 0) - figures.get("avg_candidates_attended_late_layers", 0)
        stored = memory.kv_cache_bytes
        late_share = (shape.layers - prune_layer) / shape.layers
        seq = tokens.prompt + max(tokens.generated - 1, 0)
        figures["kv_bytes_stored"] = stored
        figures["kv_bytes_attended_per_step"] = int(stored * (1 - late_share * hidden_per_step / seq)) if seq else 0
        return figures

    def ask(
        self,
        video: str | Path | DecodedVideo,
        question: str,
        options: RunOptions | None = None,
        on_text: TextCallback | None = None,
        *,
        record: bool = False,
    ) -> Report:
        """Answer ``question`` about ``video``; ``on_text`` receives the answer as it is generated."""
        options = options or RunOptions()
        if self.loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.loaded.device)
        prepared = self.prepare(video, options.video, with_signals=needs_vision_signals([options.method.method]))
        return self.answer(prepared, question, options, on_text, record=record)


def stored_kv_bytes(method: CompressionMethod, text_config: Any, seq_len: int, element: int) -> int:
    """KV-cache bytes at the end of generation, less what the method dropped from later layers."""
    full = kv_cache_bytes(text_config, seq_len, element)
    dropped = method.dropped_kv()
    if dropped is None:
        return full
    first_layer, entries = dropped
    layers = int(text_config.num_hidden_layers)
    return full - kv_cache_bytes(text_config, entries, element) * (layers - first_layer) // layers


def choose_decoder(gen: Any, loaded: LoadedModel, method: CompressionMethod) -> str:
    """The decode loop for this run: ``auto`` takes the CUDA-graph loop for greedy decoding on one GPU
    with a method whose cache keeps its shape (not FastV, not DyCoke with eviction), ``hf`` otherwise."""
    if gen.decoder != "auto":
        if gen.decoder == "graph" and loaded.device.type != "cuda":
            raise ConfigError(f"decoder 'graph' needs a CUDA device, the model is on {loaded.device.type}")
        if gen.decoder != "hf" and method.shrinks_cache:
            raise ConfigError(f"{method.name} shrinks the KV cache of later layers: use --decoder hf or auto with it")
        return str(gen.decoder)
    single_device = len(set(getattr(loaded.model, "hf_device_map", {"": 0}).values())) <= 1
    if loaded.device.type == "cuda" and not gen.do_sample and single_device and not method.shrinks_cache:
        return "graph"
    return "hf"


def generation_kwargs(loaded: LoadedModel, gen: Any) -> dict[str, Any]:
    """Arguments for ``generate``: greedy unless sampling was asked for; stop at ``<|im_end|>``/EOS."""
    tokenizer = loaded.tokenizer
    eos: list[int] = []
    for candidate in (
        loaded.model.generation_config.eos_token_id,
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ):
        for tid in candidate if isinstance(candidate, list) else [candidate]:
            if isinstance(tid, int) and tid >= 0 and tid not in eos and tid != tokenizer.unk_token_id:
                eos.append(tid)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens or None,
        "do_sample": gen.do_sample,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _oom_guard(stage: str, num_frames: int) -> Iterator[None]:
    """Turn a CUDA out-of-memory error into one clear line."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        raise OutOfMemoryError(
            f"out of GPU memory in {stage} with {num_frames} frames; try fewer --frames, --method dycoke, "
            "a smaller model, or --device-map auto"
        ) from exc
