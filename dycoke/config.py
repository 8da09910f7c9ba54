"""Options of a run, as frozen dataclasses validated on construction.

Nothing here imports torch: the CLI builds and validates these before any heavy import, so that an
impossible value is reported in well under a second.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from dycoke.errors import ConfigError

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
PAPER_SYSTEM_PROMPT = "You are a helpful assistant."

Method = Literal["full", "dycoke", "fastv", "prumerge", "random", "uniform"]
METHODS: tuple[str, ...] = ("full", "dycoke", "fastv", "prumerge", "random", "uniform")
GateMode = Literal["official", "reuse"]


def needs_vision_signals(methods: list[str]) -> bool:
    """Whether any of ``methods`` selects by the vision tower's attention (record it while encoding)."""
    return "prumerge" in methods


PromptStyle = Literal["paper", "checkpoint"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
DECODERS: tuple[str, ...] = ("auto", "hf", "static", "graph")
SEEK_MODES: tuple[str, ...] = ("exact", "keyframe")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
_MEMORY_RE = re.compile(r"^\d+(\.\d+)?(B|KiB|MiB|GiB|KB|MB|GB)$")


def _check_range(
    name: str, value: float, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    """Raise ConfigError unless ``lo <= value <= hi`` (with optional open ends)."""
    ok = not math.isnan(value)
    ok = ok and (value > lo if lo_open else value >= lo)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")


@dataclass(frozen=True)
class VideoOptions:
    """Which frames to sample.

    ``num_frames`` frames spread uniformly over the video (or the ``start_s``..``end_s`` window), the
    rule of the paper's evaluation; or, when ``fps`` is set, frames at that rate, at most ``max_frames``.
    ``seek="exact"`` decodes exactly those frames (the paper's evaluation); ``"keyframe"`` takes the
    nearest key frame of each (much cheaper on long videos; the report gives the largest time shift).
    """

    num_frames: int = 32
    fps: float | None = None
    max_frames: int = 64
    start_s: float | None = None
    end_s: float | None = None
    seek: str = "exact"

    def __post_init__(self) -> None:
        if self.seek not in SEEK_MODES:
            raise ConfigError(f"seek must be one of {', '.join(SEEK_MODES)}, got '{self.seek}'")
        if self.num_frames < 1:
            raise ConfigError(f"frames must be a positive integer, got {self.num_frames}")
        if self.max_frames < 1:
            raise ConfigError(f"max-frames must be a positive integer, got {self.max_frames}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"fps must be a positive number, got {self.fps}")
        if self.start_s is not None and not self.start_s >= 0:
            raise ConfigError(f"start must be >= 0 seconds, got {self.start_s}")
        if self.end_s is not None and not self.end_s > (self.start_s or 0.0):
            raise ConfigError(f"end must be greater than start ({self.start_s or 0.0} s), got {self.end_s}")


@dataclass(frozen=True)
class ModelOptions:
    """Which checkpoint, and where it runs.

    ``model`` is a hub id or a local directory in the same format. ``device`` is ``auto`` (CUDA when
    present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``dtype`` ``auto`` means bfloat16 on CUDA and
    float32 on CPU. ``device_map="auto"`` spreads the model over every visible GPU with accelerate, and
    what does not fit into CPU memory (executed on the first GPU, weights streamed); ``max_gpu_memory``
    (e.g. ``"70GiB"``) caps what it puts on each GPU.
    """

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_gpu_memory: str | None = None

    def __post_init__(self) -> None:
        if self.max_gpu_memory is not None:
            if not _MEMORY_RE.match(self.max_gpu_memory):
                raise ConfigError(
                    f"max-gpu-memory must be a size such as 70GiB or 500MiB (B, KiB, MiB, GiB, KB, MB, GB), "
                    f"got '{self.max_gpu_memory}'"
                )
            if self.device_map != "auto":
                raise ConfigError("max-gpu-memory caps what --device-map auto puts on each GPU: give --device-map auto")
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"device-map must be 'auto' (or unset), got '{self.device_map}'")
        if not self.model:
            raise ConfigError("model must be a hub id or a local directory, got an empty string")


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding: greedy by default (as the paper evaluates), sampling on request.

    ``min_new_tokens`` forces a length (benchmarks on random weights use it). ``decoder`` picks the
    decode loop: ``hf`` (transformers' ``generate``), ``static`` (greedy on a static KV cache),
    ``graph`` (the same, one CUDA graph replay per token) or ``auto`` (``graph`` for greedy decoding on
    one CUDA device, ``hf`` otherwise). All give the same tokens. ``fused_step`` (static and graph
    loops, Qwen2-family models): decode steps with fused projections and kernels
    (``dycoke/decoding/fused.py``); off, the model's own modules run each step. ``prefill_rows``: with
    DP eviction (``dp_evict``) the static and graph loops prefill a larger batch, and take its first
    decode step, this many rows at a time, each group's cache cut down before the next group's is made:
    the memory peak then holds the batch's evicted cache and one group's whole one, so larger batches
    fit; 0 prefills the batch at once. The tokens are the same.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    decoder: str = "auto"
    fused_step: bool = True
    prefill_rows: int = 16

    def __post_init__(self) -> None:
        if self.decoder not in DECODERS:
            raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got '{self.decoder}'")
        if self.do_sample and self.decoder in ("static", "graph"):
            raise ConfigError(f"decoder '{self.decoder}' decodes greedily; sample with --decoder hf or auto")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max-new-tokens must be a positive integer, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min-new-tokens must be in [0, max-new-tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        _check_range("temperature", self.temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_range("top-p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k < 0:
            raise ConfigError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.prefill_rows < 0:
            raise ConfigError(f"prefill-rows must be >= 0 (0 prefills a batch at once), got {self.prefill_rows}")


@dataclass(frozen=True)
class PromptOptions:
    """``paper``: the chat prompt of the paper's evaluation (video before the question);
    ``checkpoint``: the checkpoint's own chat template."""

    style: PromptStyle = "paper"
    system_prompt: str = PAPER_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.style not in ("paper", "checkpoint"):
            raise ConfigError(f"prompt must be 'paper' or 'checkpoint', got '{self.style}'")


@dataclass(frozen=True)
class MethodOptions:
    """The compression method and its knobs.

    ``full`` gives the LLM every visual token. ``dycoke`` applies temporal token merging with ratio
    ``merge_ratio`` (K) at prefill and prunes the visual KV cache at every decode step: layers from
    ``prune_layer`` (L) on attend only to the top ``1 - prune_ratio`` (P) of the visual tokens, chosen by
    the attention of layer L-1, whenever the attention pattern moved (cosine < ``gate_threshold``).

    Baselines: ``fastv`` keeps the ``fastv_keep`` share of visual tokens best ranked by the last prompt
    token's attention at layer ``fastv_layer - 1`` and drops the rest from layer ``fastv_layer`` on;
    ``prumerge`` keeps the vision tower's attention outliers of each frame and merges the others into
    them (``prumerge_plus`` adds spatially uniform samples). Equal-budget controls: ``random`` (a seeded
    choice of tokens, ``budget_seed``) and ``uniform`` (fewer frames, evenly spaced) keep, by default,
    as many tokens as DyCoke's merging with ``merge_ratio`` would; ``budget_tokens`` (visual tokens in the
    LLM input, newline included, as ``tokens.visual`` counts them) or ``budget_ratio`` (share of the frame
    tokens) set another budget. ``dp_evict`` (a deviation, off by default) removes the visual entries the
    first decode step does not keep from the caches of layers >= L for good, freeing their memory.
    """

    method: Method = "dycoke"
    merge_ratio: float = 0.7
    prune_layer: int = 3
    prune_ratio: float = 0.7
    gate_threshold: float = 0.9
    gate_mode: GateMode = "official"
    similarity_fp32: bool = True
    prune_last_window: bool = False
    keep_odd_last_frame: bool = False
    fastv_layer: int = 2
    fastv_keep: float = 0.35
    prumerge_plus: bool = False
    budget_tokens: int | None = None
    budget_ratio: float | None = None
    budget_seed: int = 0
    dp_evict: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.dp_evict and self.gate_threshold <= 0:
            raise ConfigError(
                f"dp-evict needs a gate threshold above 0 (the first decode step must prune), got {self.gate_threshold}"
            )
        if self.fastv_layer < 1:
            raise ConfigError(f"fastv-layer must be >= 1, got {self.fastv_layer}")
        _check_range("fastv-keep", self.fastv_keep, 0.0, 1.0, lo_open=True)
        if self.budget_tokens is not None and self.budget_ratio is not None:
            raise ConfigError("give --budget-tokens or --budget-ratio, not both")
        if self.budget_tokens is not None and self.budget_tokens < 2:
            raise ConfigError(
                f"budget-tokens must be >= 2 (the newline token and one frame token), got {self.budget_tokens}"
            )
        if self.budget_ratio is not None:
            _check_range("budget-ratio", self.budget_ratio, 0.0, 1.0, lo_open=True)
        _check_range("merge-ratio (K)", self.merge_ratio, 0.0, 1.0, hi_open=True)
        _check_range("prune-ratio (P)", self.prune_ratio, 0.0, 1.0, hi_open=True)
        _check_range("gate-threshold", self.gate_threshold, -1.0, 1.0)
        if self.prune_layer < 1:
            raise ConfigError(f"prune-layer (L) must be >= 1, got {self.prune_layer}")
        if self.gate_mode not in ("official", "reuse"):
            raise ConfigError(f"gate-mode must be 'official' or 'reuse', got '{self.gate_mode}'")

    def check_against_model(self, num_layers: int) -> None:
        """Raise ConfigError if an option cannot apply to a model with ``num_layers`` decoder layers."""
        if self.method == "dycoke" and self.prune_layer >= num_layers:
            raise ConfigError(
                f"prune-layer (L) must be below the model's {num_layers} layers (1..{num_layers - 1}), "
                f"got {self.prune_layer}"
            )
        if self.method == "fastv" and self.fastv_layer >= num_layers:
            raise ConfigError(
                f"fastv-layer must be below the model's {num_layers} layers (1..{num_layers - 1}), "
                f"got {self.fastv_layer}"
            )


@dataclass(frozen=True)
class RunOptions:
    """Everything one question needs, besides the model."""

    video: VideoOptions = field(default_factory=VideoOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)
    method: MethodOptions = field(default_factory=MethodOptions)


def run_options(base: RunOptions | None = None, **overrides: object) -> RunOptions:
    """``base`` (default options if None) with option fields replaced by name, whichever group holds
    them: ``run_options(method="dycoke", merge_ratio=0.5, num_frames=16, max_new_tokens=64)``.

    Raises ConfigError for a name no option group has, or for an impossible value.
    """
    base = base or RunOptions()
    groups: dict[str, dict[str, object]] = {name: {} for name in _GROUP_FIELDS}
    for key, value in overrides.items():
        group = next((g for g, names in _GROUP_FIELDS.items() if key in names), None)
        if group is None:
            allowed = ", ".join(sorted(n for names in _GROUP_FIELDS.values() for n in names))
            raise ConfigError(f"unknown option '{key}'; options are: {allowed}")
        groups[group][key] = value
    return replace(
        base,
        **{group: replace(getattr(base, group), **values) for group, values in groups.items() if values},
    )


_GROUP_FIELDS: dict[str, tuple[str, ...]] = {
    "video": tuple(f.name for f in fields(VideoOptions)),
    "generation": tuple(f.name for f in fields(GenerationOptions)),
    "prompt": tuple(f.name for f in fields(PromptOptions)),
    "method": tuple(f.name for f in fields(MethodOptions)),
}


# Generation options a request may set by name besides OpenAI's own (max_tokens, temperature, top_p, seed).
_REQUEST_GENERATION_FIELDS = ("min_new_tokens", "top_k", "decoder")
_RENAMED_FIELDS = ("similarity_fp32",)  # a request says ``similarity``: "fp32" or "model", as --similarity


def request_fields() -> dict[str, str]:
    """The run options a server request may set by their field names, each with its JSON kind: "int",
    "float", "bool" or "str", with a "?" suffix when it may be null. Derived from the option classes,
    so a new option is one a request can set."""
    import typing

    kinds: dict[str, str] = {}
    for cls, names in (
        (VideoOptions, None),
        (MethodOptions, None),
        (GenerationOptions, _REQUEST_GENERATION_FIELDS),
    ):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if (names is not None and f.name not in names) or f.name in _RENAMED_FIELDS:
                continue
            kinds[f.name] = _json_kind(hints[f.name])
    return kinds


def _json_kind(hint: object) -> str:
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    base = args[0] if optional and len(args) == 1 else hint
    if typing.get_origin(base) is typing.Literal:
        base = type(typing.get_args(base)[0])
    kind = {int: "int", float: "float", bool: "bool", str: "str"}[base]  # type: ignore[index]
    return kind + ("?" if optional else "")
