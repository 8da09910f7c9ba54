"""What a run cost, as plain data: token counts, timings, memory. Nothing here prints.

``Report.to_dict()`` is the JSON shape of ``dycoke ask --json`` (nested keys such as
``tokens.visual`` and ``timings_s.total``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass
class VideoInfo:
    """The source video and the frames sampled from it."""

    path: str
    source_fps: float
    source_num_frames: int
    duration_s: float
    source_size: tuple[int, int]
    decoded_size: tuple[int, int]
    indices: list[int]
    timestamps_s: list[float]
    warnings: list[str] = field(default_factory=list)
    seek: str = "exact"
    max_shift_s: float = 0.0
    decode_cost: dict[str, int] = field(default_factory=dict)
    encoded_while_reading: int = 0  # frames the vision encoder took while the rest were still decoding


@dataclass
class TokenCounts:
    """Token counts of one answer.

    ``visual`` counts the video tokens in the LLM input, the trailing newline token included
    (32 frames uncompressed: 32*196 + 1 = 6273); ``visual_uncompressed`` is that count without
    compression; ``prompt`` is the whole LLM input (text + visual).
    """

    frames: int
    tokens_per_frame: int
    visual_per_frame: list[int]
    visual: int
    visual_uncompressed: int
    prompt: int
    generated: int


@dataclass
class Timings:
    """Seconds per stage. ``prefill`` runs from the start of generation to the first token
    (time to first token of the LLM); ``ttft`` runs from the start of the whole job.

    ``load`` (checkpoint to a ready model) is reported once, in the first answer of a loaded model;
    ``startup`` (process start to the model load: imports, CUDA initialisation) and ``wall`` (process
    start to the end of the answer, what the user waited for) are set by the command line only.

    ``shared_prefix`` is the prefill of the system prompt and video tokens when several questions
    share it (batch mode); ``prefill`` is then the question part only. Stages shared by several
    questions (video, encoder, compression, shared prefix) count in full in each question's
    ``ttft`` and ``total``: the latency of that question had it been the first.
    """

    video_decode: float = 0.0
    preprocess: float = 0.0
    vision_encoder: float = 0.0
    compress: float = 0.0
    shared_prefix: float = 0.0
    prefill: float = 0.0
    ttft: float = 0.0
    decode: float = 0.0
    ms_per_token: float | None = None
    total: float = 0.0
    startup: float | None = None
    load: float | None = None
    wall: float | None = None


@dataclass
class Memory:
    """Memory of the run. ``peak_gpu_bytes`` is None off CUDA. ``kv_cache_bytes`` is what the KV cache
    stores at the end of generation (all layers, keys and values)."""

    device: str
    dtype: str
    peak_gpu_bytes: int | None
    kv_cache_bytes: int


@dataclass
class Trace:
    """What a method kept, for drawing (``dycoke/visualize.py``); recorded only when asked for.

    Token positions are (frame, patch) with patch in 0..T-1 on the pooled ``grid`` x ``grid`` layout
    (row-major); patch -1 is a token that stands for no single patch (PruMerge's summary token).

    Attributes:
        frames: (F, H, W, 3) uint8, the sampled frames as decoded.
        kept: (frame, patch) of every visual token given to the LLM (newline excluded).
        late_kept: FastV: the tokens still attended from layer K on; None for other methods.
        step_attention: DyCoke: per decode step, each frame's share of the visual attention at layer L-1.
        step_kept: DyCoke: per decode step, each frame's tokens attended by layers >= L.
    """

    method: str
    frames: Any
    tokens_per_frame: int
    grid: int
    kept: list[tuple[int, int]]
    late_kept: list[tuple[int, int]] | None = None
    late_layer: int | None = None
    step_attention: list[list[float]] = field(default_factory=list)
    step_kept: list[list[int]] = field(default_factory=list)


@dataclass
class Report:
    """Everything about one answered question."""

    answer: str
    method: str
    model: str
    random_weights: bool
    question: str
    video: VideoInfo
    tokens: TokenCounts
    timings_s: Timings
    memory: Memory
    options: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=dict)
    decoder: str = ""  # the decode loop that ran: hf (generate), static or graph
    token_ids: list[int] = field(default_factory=list)
    trace: Trace | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists); the drawing trace is left out."""
        data = asdict(replace(self, trace=None))
        del data["trace"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """The report ``to_dict`` gave (a server's reply, a JSON file); unknown keys are ignored."""

        def known(kind: type, values: dict[str, Any]) -> dict[str, Any]:
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in values.items() if k in names}

        video = known(VideoInfo, data["video"])
        video["source_size"] = tuple(video["source_size"])
        video["decoded_size"] = tuple(video["decoded_size"])
        top = known(cls, data)
        top.update(
            video=VideoInfo(**video),
            tokens=TokenCounts(**known(TokenCounts, data["tokens"])),
            timings_s=Timings(**known(Timings, data["timings_s"])),
            memory=Memory(**known(Memory, data["memory"])),
            trace=None,
        )
        return cls(**top)


def kv_cache_bytes(text_config: Any, seq_len: int, bytes_per_value: int, batch: int = 1) -> int:
    """Bytes a full KV cache holds: 2 (K and V) x layers x kv heads x head dim x tokens x batch."""
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    layers = int(text_config.num_hidden_layers)
    return 2 * layers * kv_heads * head_dim * seq_len * batch * bytes_per_value
