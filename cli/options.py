"""The options `ask` and `batch` share: one definition each, and one place that turns them into
the library's option dataclasses (validated there, before anything heavy is imported)."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from dycoke.config import (
    GenerationOptions,
    MethodOptions,
    ModelOptions,
    PromptOptions,
    RunOptions,
    VideoOptions,
)
from dycoke.errors import ConfigError

Model = Annotated[str, typer.Option("--model", "-m", help="Hub id or local checkpoint directory.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]
DeviceMap = Annotated[str | None, typer.Option("--device-map", help="'auto' spreads a large model over all GPUs.")]
MaxGpuMemory = Annotated[
    str | None,
    typer.Option(help="With --device-map auto: cap per GPU (e.g. 70GiB); the rest goes to CPU memory."),
]
Frames = Annotated[int, typer.Option("--frames", "-f", help="Frames sampled uniformly (the paper uses 32).")]
Fps = Annotated[float | None, typer.Option(help="Sample at this rate instead (capped by --max-frames).")]
MaxFrames = Annotated[int, typer.Option(help="Cap on frames with --fps.")]
Seek = Annotated[
    str,
    typer.Option(help="exact (the sampled frames, as the paper evaluates) or keyframe (nearest key frames: fast)."),
]
Start = Annotated[float | None, typer.Option(help="Start of the time window, seconds.")]
End = Annotated[float | None, typer.Option(help="End of the time window, seconds.")]
MethodName = Annotated[str, typer.Option(help="dycoke, full (every visual token), fastv, prumerge, random or uniform.")]
MergeRatio = Annotated[
    float, typer.Option("--merge-ratio", "-K", help="DyCoke K: share of tokens TTM drops from merged frames.")
]
PruneLayer = Annotated[
    int, typer.Option("--prune-layer", "-L", help="DyCoke L: layers from L on attend to the kept KV only.")
]
PruneRatio = Annotated[
    float, typer.Option("--prune-ratio", "-P", help="DyCoke P: share of visual KV pruned at a decode step.")
]
GateThreshold = Annotated[float, typer.Option(help="Prune when attention moved: cosine below this.")]
GateMode = Annotated[
    str, typer.Option(help="official (stable step: prune nothing) or reuse (keep the last selection).")
]
Similarity = Annotated[str, typer.Option(help="TTM similarities in fp32 (default) or the model dtype.")]
PruneLastWindow = Annotated[
    bool, typer.Option(help="TTM: also re-prune the last 4-frame window (the reference skips it).")
]
KeepOddLastFrame = Annotated[bool, typer.Option(help="TTM: keep an odd last frame whole (the reference drops it).")]
DpEvict = Annotated[
    bool,
    typer.Option(
        "--dp-evict", help="Deviation: drop the visual KV the first decode step prunes from layers >= L for good."
    ),
]
FastvLayer = Annotated[int, typer.Option(help="FastV K: layer K-1 ranks, layers K.. keep the top share.")]
FastvKeep = Annotated[float, typer.Option(help="FastV: share of visual tokens kept from layer K on.")]
PrumergePlus = Annotated[bool, typer.Option(help="PruMerge+: add spatially uniform samples to the outliers.")]
BudgetTokens = Annotated[
    int | None,
    typer.Option(help="random/uniform: visual tokens in the LLM input, newline included (default: DyCoke's)."),
]
BudgetRatio = Annotated[float | None, typer.Option(help="random/uniform: share of the frame tokens kept instead.")]
BudgetSeed = Annotated[int, typer.Option(help="random: seed of the token choice.")]
MaxNewTokens = Annotated[int, typer.Option(help="Longest answer, in tokens.")]
MinNewTokens = Annotated[int, typer.Option(help="Force at least this many tokens (benchmarks).")]
Sample = Annotated[bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (with --sample).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (with --sample).")]
TopK = Annotated[int, typer.Option(help="Top-k sampling, 0 = off (with --sample).")]
Decoder = Annotated[
    str,
    typer.Option(help="auto (CUDA graphs for greedy on one GPU), hf (transformers' generate), static, graph."),
]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
FusedStep = Annotated[
    bool,
    typer.Option(
        "--fused-step/--no-fused-step",
        help="Decode steps with fused projections and kernels (Qwen2 models, static and graph decoders).",
    ),
]
PrefillRows = Annotated[
    int,
    typer.Option(
        help="With --dp-evict: prefill a batch this many rows at a time, each group's evicted before the next "
        "(lower peak memory, larger batches fit); 0: the whole batch at once."
    ),
]
Prompt = Annotated[str, typer.Option(help="paper (the paper's evaluation prompt) or checkpoint (its template).")]
System = Annotated[str, typer.Option(help="System prompt of the paper style.")]
Compare = Annotated[
    str | None,
    typer.Option(
        "--compare",
        metavar="[METHODS]",
        help="Run several methods on the same frames (default full,dycoke) and compare them.",
    ),
]
Server = Annotated[
    str | None,
    typer.Option(envvar="DYCOKE_SERVER", help="Ask a running `dycoke serve` at this URL instead of loading a model."),
]
ApiKey = Annotated[str | None, typer.Option(envvar="DYCOKE_API_KEY", help="The server's --api-key.")]
Upload = Annotated[bool, typer.Option(help="With --server: send the video's bytes instead of its path.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No summary table on stderr.")]


def build_options(
    *,
    model: str,
    device: str,
    dtype: str,
    device_map: str | None,
    max_gpu_memory: str | None,
    frames: int,
    fps: float | None,
    max_frames: int,
    start: float | None,
    end: float | None,
    seek: str,
    method: str,
    merge_ratio: float,
    prune_layer: int,
    prune_ratio: float,
    gate_threshold: float,
    gate_mode: str,
    similarity: str,
    prune_last_window: bool,
    keep_odd_last_frame: bool,
    dp_evict: bool,
    fastv_layer: int,
    fastv_keep: float,
    prumerge_plus: bool,
    budget_tokens: int | None,
    budget_ratio: float | None,
    budget_seed: int,
    max_new_tokens: int,
    min_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    decoder: str,
    fused_step: bool,
    prompt: str,
    system: str,
    prefill_rows: int = 16,
) -> tuple[ModelOptions, RunOptions]:
    """The library's options from a command's parameters (each validated by its dataclass)."""
    model_options = ModelOptions(
        model=model, device=device, dtype=dtype, device_map=device_map, max_gpu_memory=max_gpu_memory
    )
    run = RunOptions(
        video=VideoOptions(num_frames=frames, fps=fps, max_frames=max_frames, start_s=start, end_s=end, seek=seek),
        generation=GenerationOptions(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            decoder=decoder,
            fused_step=fused_step,
            prefill_rows=prefill_rows,
        ),
        prompt=PromptOptions(style=prompt, system_prompt=system),  # type: ignore[arg-type]
        method=MethodOptions(
            method=method,  # type: ignore[arg-type]
            merge_ratio=merge_ratio,
            prune_layer=prune_layer,
            prune_ratio=prune_ratio,
            gate_threshold=gate_threshold,
            gate_mode=gate_mode,  # type: ignore[arg-type]
            similarity_fp32=similarity_fp32(similarity),
            prune_last_window=prune_last_window,
            keep_odd_last_frame=keep_odd_last_frame,
            fastv_layer=fastv_layer,
            fastv_keep=fastv_keep,
            prumerge_plus=prumerge_plus,
            budget_tokens=budget_tokens,
            budget_ratio=budget_ratio,
            budget_seed=budget_seed,
            dp_evict=dp_evict,
        ),
    )
    return model_options, run


def options_from(parameters: dict[str, Any]) -> tuple[ModelOptions, RunOptions]:
    """``build_options`` from a command's parameters (its ``locals()`` on entry): every command that
    runs the model takes the same option parameters, so a new option is added in one call, not one per
    command."""
    names = inspect.signature(build_options).parameters.items()
    # an option only some commands take (e.g. batch's --prefill-rows) keeps its default elsewhere
    return build_options(
        **{name: parameters[name] for name, p in names if name in parameters or p.default is inspect.Parameter.empty}
    )


def similarity_fp32(value: str) -> bool:
    if value not in ("fp32", "model"):
        raise ConfigError(f"similarity must be 'fp32' or 'model', got '{value}'")
    return value == "fp32"
