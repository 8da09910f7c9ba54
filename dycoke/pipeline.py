"""The story top to bottom: frames -> pixels -> features -> compression -> prompt -> generation -> report.

``VideoQA.load(...)`` loads a checkpoint once; ``ask`` answers one question about one video.
``prepare`` (decode, preprocess, encode) and ``answer_many`` (compress, prompt, generate) are separate
so that several questions or methods can share one decoded and encoded video.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dycoke.config import ModelOptions, RunOptions, VideoOptions, needs_vision_signals, run_options
from dycoke.decoding import DecodeTiming, choose_decoder, decode, generation_kwargs
from dycoke.decoding.prefix import PrefixKV, common_prefix_ok, pad_rows, prefill_prefix, trim_generated
from dycoke.decoding.streaming import TimedTextStreamer
from dycoke.errors import ConfigError, OutOfMemoryError
from dycoke.figures import compression_figures, memory_figures, token_counts
from dycoke.frame_stream import FrameStream, fork_reader
from dycoke.heap import freeze_after_load
from dycoke.methods import CompressedVisual, CompressionMethod, VisionSignals, build_method
from dycoke.model import LoadedModel, load_model
from dycoke.pinned_frames import pinned_frames
from dycoke.preprocess import preprocess_frames
from dycoke.prompt import Question, conversation_turns, expand_video_placeholder, render_prompt, tokenize_prompt
from dycoke.reading import DecodedVideo, decode_video
from dycoke.report import Report, Timings, VideoInfo
from dycoke.stream_encode import encode_while_reading
from dycoke.stream_prefill import PrefixStream
from dycoke.switches import switch
from dycoke.trace import build_trace
from dycoke.transfer import synchronize
from dycoke.video import VideoFrames
from dycoke.vision import encode_frames
from dycoke.warm_answer import wait_for_warm_answer
from dycoke.weights import WeightPrefetch

TextCallback = Callable[[str], None]

STREAM_VIDEO_ENV = "DYCOKE_STREAM_VIDEO"


def streams_video() -> bool:
    """Whether ``VideoQA.prepare`` encodes a file's frames (and prefills their tokens) while a forked
    child decodes the rest (``dycoke.frame_stream``, where the platform can): only with
    ``DYCOKE_STREAM_VIDEO=1``. Off by default: since the RGB conversion runs on threads the sample's 128
    frames read in 0.14 s, too little to hide anything behind, and on the H200 (7B, 256 tokens) streaming
    lost 0.18-0.21 s at 32 and 128 frames (``benchmarks/results/e2e-h200-rgb-pool.md``); before that it
    saved 0.17-0.19 s at 128 frames and lost elsewhere (``e2e-h200-streamed-{pinned,1080p}.md``)."""
    return switch(STREAM_VIDEO_ENV, default=False)


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
    encoded_while_reading: int = 0  # frames encoded while the video was still being decoded
    prefixes: dict[tuple[Any, ...], PrefixKV] = field(default_factory=dict)  # memoised shared prefixes

    def nbytes(self) -> int:
        """Bytes this object holds on its devices: features, pixels, signals, memoised prefixes."""
        tensors = [self.features, self.newline, self.pixels]
        if self.vision is not None:
            tensors += [self.vision.scores, self.vision.keys]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + sum(prefix.nbytes() for prefix in self.prefixes.values())


@dataclass
class PromptRows:
    """The token ids of each question's prompt, where the visual tokens sit, and the shared prefix."""

    rows: list[list[int]]
    visual_start: int
    num_visual: int
    prefix_length: int


class VideoQA:
    """Answers questions about videos with a loaded LLaVA-OneVision checkpoint."""

    def __init__(self, loaded: LoadedModel, load_s: float | None = None) -> None:
        self.loaded = loaded
        self.load_s = load_s  # reported in the first answer only

    @classmethod
    def load(
        cls,
        model: str | ModelOptions | None = None,
        *,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        weights: WeightPrefetch | None = None,
    ) -> VideoQA:
        """Load a checkpoint: a hub id or local directory (or ``ModelOptions``), on ``device`` (auto,
        cpu, cuda, cuda:N) in ``dtype`` (auto, float32, bfloat16, float16). ``weights``: its tensors
        being read already (``dycoke.weights.prefetch_weights``). Then Python's garbage collector collects
        once and freezes what exists (``dycoke.heap.freeze_after_load``; ``DYCOKE_FREEZE_HEAP=0`` not)."""
        if isinstance(model, ModelOptions):
            options = model
        else:
            given = {"device": device, "dtype": dtype, "device_map": device_map}
            options = ModelOptions(**({"model": model} if model else {}), **{k: v for k, v in given.items() if v})
        t0 = time.perf_counter()
        loaded = load_model(options, weights)
        freeze_after_load()  # no answer pays for a full collection over the libraries' and the model's objects
        return cls(loaded, load_s=time.perf_counter() - t0)

    # -- the stages ---------------------------------------------------------------------------------

    def read(self, video: str | Path, options: VideoOptions | None = None) -> DecodedVideo:
        """Decode and sample frames for this model: on a GPU into page-locked memory, whose upload is one
        DMA at full speed (``dycoke.pinned_frames``)."""
        return decode_video(video, options, sink=pinned_frames(self.loaded.device))

    def prepare(
        self,
        video: str | Path | DecodedVideo,
        options: VideoOptions | None = None,
        *,
        with_signals: bool = False,
        prefill_for: tuple[RunOptions, Question] | None = None,
    ) -> PreparedVideo:
        """Decode and sample frames (unless ``video`` is already decoded), preprocess them on the model's
        device, run the vision encoder (``with_signals``: also record what PruMerge selects by; a method
        that needs it and finds it missing runs the encoder again).

        With ``DYCOKE_STREAM_VIDEO=1`` (``streams_video``) a file given by path is decoded in a forked
        child while the frames already decoded are encoded (``dycoke.stream_encode``). PruMerge's
        signals are recorded from all frames at once, so ``with_signals`` does not stream. With
        ``prefill_for`` (the options and question about to be asked) a method that shares its prefix
        also prefills the system prompt and the video's tokens meanwhile, as their frames are encoded
        (``dycoke.stream_prefill``); ``answer`` then continues from that prefix."""
        if not isinstance(video, DecodedVideo) and not with_signals and streams_video():
            stream = fork_reader(video, options)
            if stream is not None:
                return self._prepare_streamed(stream, options or VideoOptions(), prefill_for)
        decoded = video if isinstance(video, DecodedVideo) else self.read(video, options)
        wait_for_warm_answer()  # a shallow model's first answer may still run: not beside this one's stages
        frames = decoded.frames
        loaded = self.loaded
        t1 = time.perf_counter()
        with _oom_guard("preprocessing", frames.num_frames):
            pixels = preprocess_frames(frames.frames, loaded.preprocess, device=loaded.device, dtype=loaded.dtype)
            synchronize(loaded.device)
        t2 = time.perf_counter()
        with _oom_guard("the vision encoder", frames.num_frames), torch.inference_mode():
            features, newline, vision = encode_frames(
                loaded.model, pixels, loaded.tokens_per_frame, with_signals=with_signals
            )
            synchronize(loaded.device)
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

    def _prepare_streamed(
        self, stream: FrameStream, options: VideoOptions, prefill_for: tuple[RunOptions, Question] | None
    ) -> PreparedVideo:
        loaded = self.loaded
        prefix_stream = None
        with stream:  # a bad option or question ends the child too
            if prefill_for is not None:
                run, question = prefill_for
                method = build_method(run.method, loaded.model, loaded.num_layers)
                conversation = conversation_turns(question)
                prompts = self.prompt_rows([conversation], run, 1, method.shares_prefix)
                if prompts.prefix_length:
                    prefix_stream = PrefixStream(loaded, method, prompts.rows[0][: prompts.visual_start])
            wait_for_warm_answer()
            with _oom_guard("the vision encoder", options.num_frames):
                streamed = encode_while_reading(stream, loaded, prefix_stream.advance if prefix_stream else None)
        decoded = streamed.decoded
        prepared = PreparedVideo(
            frames=decoded.frames,
            path=decoded.path,
            features=streamed.features,
            newline=streamed.newline,
            num_frames=decoded.frames.num_frames,
            tokens_per_frame=loaded.tokens_per_frame,
            decode_s=decoded.decode_s,
            preprocess_s=streamed.preprocess_s,
            encode_s=streamed.encode_s,
            pixels=streamed.pixels,
            encoded_while_reading=streamed.encoded_while_reading,
        )
        if prefix_stream is not None:
            t0 = time.perf_counter()
            with _oom_guard("prefill", prepared.num_frames), torch.inference_mode():
                prefix_stream.advance(streamed.frame_features, prepared.num_frames, streamed.newline)
                prefix = prefix_stream.result()
                synchronize(loaded.device)
            if prefix is not None:
                prefix.unreported_s = time.perf_counter() - t0
                prompts = self.prompt_rows([conversation], run, prefix_stream.tokens_done + 1, True)
                prepared.prefixes[_prefix_key(run, prompts)] = prefix
        return prepared

    def compress(self, prepared: PreparedVideo, method: CompressionMethod) -> tuple[CompressedVisual, torch.Tensor]:
        """The method's visual tokens, and the (N+1, D) tokens the LLM sees (the newline appended)."""
        loaded = self.loaded
        with _oom_guard("compression", prepared.num_frames), torch.inference_mode():
            if method.needs_vision_signals and prepared.vision is None:
                prepared.vision = encode_frames(
                    loaded.model, prepared.pixels, loaded.tokens_per_frame, with_signals=True
                )[2]
            visual = method.compress(prepared.features, prepared.num_frames, prepared.tokens_per_frame, prepared.vision)
            visual_tokens = torch.cat([visual.tokens, prepared.newline.to(visual.tokens.dtype)], dim=0)
            synchronize(loaded.device)
        return visual, visual_tokens

    def prompt_rows(
        self, questions: Sequence[Question], options: RunOptions, num_visual: int, share: bool
    ) -> PromptRows:
        """Tokenised prompts with the video placeholder run set to ``num_visual``; the length of the
        part every row shares (system prompt + video) when ``share`` and the template allows it."""
        tokenizer, video_token = self.loaded.tokenizer, self.loaded.video_token_id
        rows, visual_start = [], 0
        for question in questions:
            text = render_prompt(tokenizer, question, options.prompt)
            ids, visual_start = expand_video_placeholder(tokenize_prompt(tokenizer, text), video_token, num_visual)
            rows.append(ids)
        prefix_length = visual_start + num_visual if share else 0
        if prefix_length and not common_prefix_ok(rows, prefix_length):
            prefix_length = 0  # a template that puts text before the video per question: nothing to share
        return PromptRows(rows=rows, visual_start=visual_start, num_visual=num_visual, prefix_length=prefix_length)

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
        return self.answer_many(prepared, [question], options, share_prefix=None, on_text=on_text, record=record)[0]

    def answer_many(
        self,
        prepared: PreparedVideo,
        questions: list[Question],
        options: RunOptions | None = None,
        *,
        batch_size: int = 1,
        share_prefix: bool | None = True,
        on_text: TextCallback | None = None,
        on_texts: list[TextCallback | None] | None = None,
        on_reports: Callable[[list[Report]], None] | None = None,
        record: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> list[Report]:
        """Answer several questions about one prepared video, compressing its tokens once.

        With ``share_prefix`` the system prompt and video tokens are prefilled once and every question
        continues from that KV cache (``dycoke/decoding/prefix.py``); ``batch_size`` questions generate
        together (left padding, a mask and a DyCoke keep set per row). Answers equal those of
        answering each question alone, up to floating-point summation order. ``on_reports`` receives
        each batch's reports as soon as it completes; ``on_text`` streams (one question only),
        ``on_texts[i]`` streams question i (any batch size). A question is a string or a conversation
        (``("user"|"assistant", text)`` turns ending with a user turn; the video goes with the first).
        The shared prefix's KV is memoised on ``prepared`` per method and prompt, so a later call on the
        same prepared video skips its prefill (``share_prefix=None``: use a memoised prefix, never prefill
        one; ``answer`` does, after a ``prepare`` that prefilled it). ``stop()`` is polled after every
        decode step: True ends the batch's generation early. ``record`` keeps what the method kept in ``Report.trace``.
        """
        options = options or RunOptions()
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        if on_text is not None and len(questions) != 1:
            raise ConfigError("streaming (on_text) answers one question at a time")
        if on_texts is not None and len(on_texts) != len(questions):
            raise ConfigError(f"on_texts needs one entry per question ({len(questions)}), got {len(on_texts)}")
        conversations = [conversation_turns(question) for question in questions]  # a bad one fails before any work
        loaded = self.loaded
        method = build_method(options.method, loaded.model, loaded.num_layers)
        method.record = record
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)

        t0 = time.perf_counter()
        visual, visual_tokens = self.compress(prepared, method)
        compress_s = time.perf_counter() - t0
        prompts = self.prompt_rows(
            conversations, options, int(visual_tokens.shape[0]), share_prefix is not False and method.shares_prefix
        )

        prefix, prefix_s = None, 0.0
        if prompts.prefix_length:
            key = _prefix_key(options, prompts)
            prefix = prepared.prefixes.get(key)
            if prefix is None and share_prefix is None:
                prompts = replace(prompts, prefix_length=0)
            elif prefix is not None:
                prefix_s, prefix.unreported_s = prefix.unreported_s, 0.0
            else:
                t0 = time.perf_counter()
                with _oom_guard("prefill", prepared.num_frames), torch.inference_mode():
                    prefix_ids = torch.tensor([prompts.rows[0][: prompts.prefix_length]], device=loaded.device)
                    prefix = prefill_prefix(loaded.model, self._embed(prefix_ids, visual_tokens))
                    synchronize(loaded.device)
                prefix_s = time.perf_counter() - t0
                prepared.prefixes[key] = prefix

        reports: list[Report] = []
        for first in range(0, len(questions), batch_size):
            chunk = list(range(first, min(first + batch_size, len(questions))))
            streams = [on_texts[i] for i in chunk] if on_texts is not None else [on_text]
            generated, timing = self._generate(chunk, prompts, visual_tokens, prefix, method, options, streams, stop)
            batch_reports = []
            for sample, (index, tokens_out) in enumerate(zip(chunk, generated, strict=True)):
                timings = _timings(prepared, compress_s, prefix_s, timing, len(tokens_out))
                report = self._report(
                    prepared,
                    conversations[index][-1][1],
                    options,
                    method,
                    visual,
                    prompts.rows[index],
                    tokens_out,
                    timings,
                    sample,
                )
                report.decoder = timing.decoder
                report.timings_s.load, self.load_s = self.load_s, None
                if record:
                    report.trace = build_trace(
                        method, visual, prepared.frames.frames, prepared.tokens_per_frame, sample, len(tokens_out)
                    )
                batch_reports.append(report)
            if on_reports is not None:
                on_reports(batch_reports)
            reports.extend(batch_reports)
        return reports

    def ask(
        self,
        video: str | Path | DecodedVideo,
        question: str,
        options: RunOptions | None = None,
        on_text: TextCallback | None = None,
        *,
        record: bool = False,
        **overrides: Any,
    ) -> Report:
        """Answer ``question`` about ``video``; ``on_text`` receives the answer as it is generated.

        Any option field can be given by name (``method="dycoke"``, ``merge_ratio=0.7``,
        ``num_frames=32``, ``max_new_tokens=64``, ...): it overrides ``options``.
        """
        options = run_options(options, **overrides)
        if self.loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.loaded.device)
        signals = needs_vision_signals([options.method.method])
        prepared = self.prepare(video, options.video, with_signals=signals, prefill_for=(options, question))
        return self.answer(prepared, question, options, on_text, record=record)

    # -- helpers of the stages ----------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) ids -> (B, S, D) embeddings with each row's video placeholders replaced, in order."""
        ids = ids.to(self.loaded.device)  # a device map's hooks move it on where the embedding runs
        embeds = self.loaded.model.get_input_embeddings()(ids)
        mask = (ids == self.loaded.video_token_id).unsqueeze(-1).to(embeds.device)
        rows_with_video = int(mask.any(dim=1).sum())
        source = visual_tokens.to(embeds.device, embeds.dtype).repeat(rows_with_video, 1)
        return embeds.masked_scatter(mask, source)

    def _generate(
        self,
        chunk: list[int],
        prompts: PromptRows,
        visual_tokens: torch.Tensor,
        prefix: PrefixKV | None,
        method: CompressionMethod,
        options: RunOptions,
        streams: list[TextCallback | None],
        stop: Callable[[], bool] | None,
    ) -> tuple[list[list[int]], DecodeTiming]:
        """Generate for the prompts of ``chunk`` as one batch; the generated ids of each row."""
        loaded = self.loaded
        gen = options.generation
        kwargs = generation_kwargs(loaded.model, loaded.tokenizer, gen)
        rows = [prompts.rows[i] for i in chunk]
        padded = pad_rows(rows, prompts.visual_start, prefix.length if prefix else 0, kwargs["pad_token_id"])
        streamer = TimedTextStreamer(loaded.tokenizer, on_texts=streams)
        decoder = choose_decoder(gen, loaded.device, loaded.single_device)
        with _oom_guard("generation", len(rows)), torch.inference_mode():
            # the static loops prefill only what follows a shared prefix: its (B, P, D) embeddings (the
            # video's tokens once per row) would be made for nothing
            after = prefix.length if prefix is not None and decoder != "hf" else 0
            embeds = self._embed(padded.ids[:, after:], visual_tokens)
            mask = padded.attention_mask.to(embeds.device)
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            output, timing = decode(
                loaded.model,
                decoder,
                kwargs,
                method,
                embeds=embeds,
                attention_mask=mask,
                visual_starts=padded.visual_starts[0] if len(rows) == 1 else padded.visual_starts,
                num_visual=prompts.num_visual,
                prefix=prefix,
                streamer=streamer,
                stop=stop,
                fused_step=gen.fused_step,
                prefill_rows=gen.prefill_rows,
            )
        return [trim_generated(row, kwargs["eos_token_id"]) for row in output.tolist()], timing

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
        tokens = token_counts(
            prepared.num_frames, prepared.tokens_per_frame, visual.per_frame, len(ids), len(generated)
        )
        memory = memory_figures(method, loaded.text_config, loaded.device, loaded.dtype, tokens)
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
                warnings=[*frames.warnings, *method.warnings],
                seek=frames.seek,
                max_shift_s=frames.max_shift_s,
                decode_cost=dict(frames.decode_cost),
                encoded_while_reading=prepared.encoded_while_reading,
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
            compression=compression_figures(method, options, loaded.text_config, tokens, memory, loaded.dtype, sample),
            token_ids=generated,
        )


def _prefix_key(options: RunOptions, prompts: PromptRows) -> tuple[Any, ...]:
    """What a memoised prefix is found by: the method's options and the prefix's token ids."""
    return (astuple(options.method), tuple(prompts.rows[0][: prompts.prefix_length]))


def _timings(prepared: PreparedVideo, compress_s: float, prefix_s: float, timing: DecodeTiming, n_gen: int) -> Timings:
    """Per-question timings; stages shared by several questions count in full for each."""
    shared = prepared.decode_s + prepared.preprocess_s + prepared.encode_s + compress_s + prefix_s
    return Timings(
        video_decode=prepared.decode_s,
        preprocess=prepared.preprocess_s,
        vision_encoder=prepared.encode_s,
        compress=compress_s,
        shared_prefix=prefix_s,
        prefill=timing.prefill,
        ttft=shared + timing.prefill,
        decode=timing.decode,
        ms_per_token=1000 * timing.decode / (timing.steps - 1) if timing.steps > 1 and n_gen > 1 else None,
        total=shared + timing.total,
    )


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
