"""A first answer's per-process GPU costs paid while the model loads, by a shallow copy of it.

The first answer in a fresh process took 1.34 s against 0.65 s for the second (7B, H200, DyCoke,
``benchmarks/bench_cold.py``). Its compression ran 0.14-0.15 s against 2 ms warm and its prefill
0.54-0.63 s against 0.1-0.2 s: CUDA loads each kernel of torch, cuBLAS and the attention libraries at
its first launch (``CUDA_MODULE_LOADING=LAZY``), and cuBLAS picks its kernels per shape. With every module
loaded at start (``EAGER``) the compression took 4 ms and the prefill 0.34-0.40 s, but the vision
encoder 0.7 s (every cuDNN kernel loaded at its first convolution). The tiny-tensor warm-up
(``dycoke.warmup``) loads only what tiny shapes use.

So while the weights load, ``start_warm_answer`` builds a *shallow* model on the GPU: the
checkpoint's configuration with a few language-model layers and one or two vision layers (random
weights, every size as in the checkpoint), and answers one question with it on a synthetic clip the
size of a phone video, the way ``ask`` answers: the same preprocessing, vision encoder, compression,
prompt, a prefill of about the real prompt's length and the fused decode step (without the CUDA
graph, whose capture would block other threads' allocations). The kernels and cuBLAS plans the real
answer will use are then loaded: with it, the first answer took 0.99 s against 0.62 s for the second
(``benchmarks/results/cold-h200-warm-answer-ab-{on,off}.json``). The torch calls release the
interpreter lock, so this overlaps the main thread's model build. Two things are never run side by
side with the main thread: building a model (torch's default dtype and default device, and
transformers' build-time patches, are process-wide: the real build waits for the shallow one,
``WarmAnswer.wait_built``) and an answer's graph capture (the real answer waits for the warm one to
end, ``wait_for_warm_answer``). Any failure here is silent: the answer then pays the costs.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Any

import torch

from dycoke.switches import switch

WARM_ANSWER_ENV = "DYCOKE_WARM_ANSWER"
"""Set to 0 to turn the warm answer off (for measurements)."""

TEXT_LAYERS = 4
"""Language-model layers of the shallow model at least: the default method's layer options (DyCoke's
pruning layer 3, FastV's 2) need a layer after them (``_text_layers``)."""

MARGIN_BYTES = 4 << 30
"""Free GPU memory kept beyond the shallow model and the real weights still to load: the warm
answer's activations (32 frames of vision encoder, a 6k-token prefill) fit in it."""

CLIP_FRAMES, CLIP_HEIGHT, CLIP_WIDTH = 32, 480, 640
"""The synthetic clip: the default frame count, larger than the vision input on both sides (so the
resize takes the antialiased shrinking path that real videos take)."""

_THREADS: list[threading.Thread] = []
_LOCK = threading.Lock()


def shallow_config(config: Any, text_layers: int) -> Any:
    """A copy of a LLaVA-OneVision ``config`` with ``text_layers`` language-model layers and as few vision
    layers as its vision feature layer allows; every width, head count and vocabulary as they were."""
    shallow = copy.deepcopy(config)
    text = shallow.text_config
    text_layers = min(text_layers, int(text.num_hidden_layers))
    text.num_hidden_layers = text_layers
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:text_layers]
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = min(int(text.max_window_layers), text_layers)
    feature_layer = getattr(shallow, "vision_feature_layer", -1)
    deepest = max(feature_layer) if isinstance(feature_layer, list | tuple) else feature_layer
    vision = shallow.vision_config
    needed = -int(deepest) if int(deepest) < 0 else int(deepest) + 1
    vision.num_hidden_layers = max(1, min(needed, int(vision.num_hidden_layers)))
    # no dtype: transformers builds the sub-models under a process-wide default dtype of the config's dtype
    # otherwise (``warm_answer`` casts the weights itself)
    for part in (shallow, text, vision):
        part.dtype = None
    return shallow


def shallow_bytes(config: Any, dtype: torch.dtype) -> int:
    """Approximate bytes of the shallow model of ``config`` (already shallow) in ``dtype``."""
    text, vision = config.text_config, config.vision_config
    hidden, width = int(text.hidden_size), int(text.intermediate_size)
    heads, kv_heads = int(text.num_attention_heads), int(text.num_key_value_heads)
    head = int(getattr(text, "head_dim", None) or hidden // heads)
    layer = hidden * (heads * head) * 2 + hidden * (kv_heads * head) * 2 + 3 * hidden * width
    v_hidden, v_width = int(vision.hidden_size), int(vision.intermediate_size)
    vision_layer = 4 * v_hidden * v_hidden + 2 * v_hidden * v_width
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    params = (1 if tied else 2) * int(text.vocab_size) * hidden + int(text.num_hidden_layers) * layer
    params += int(vision.num_hidden_layers) * vision_layer + v_hidden * hidden + hidden * hidden
    return params * torch.empty((), dtype=dtype).element_size()


class WarmAnswer:
    """A running warm answer: its thread, and ``built`` once its model exists (or its build failed)."""

    def __init__(self, thread: threading.Thread, built: threading.Event) -> None:
        self.thread, self.built = thread, built

    def wait_built(self, timeout_s: float = 60.0) -> None:
        """Wait until the shallow model is built: only then may another model build start."""
        self.built.wait(timeout_s)


def start_warm_answer(
    config: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    preprocess: Any,
    source: str,
    bytes_to_load: int,
) -> WarmAnswer | None:
    """Answer one question on a shallow copy of the model of ``config`` on a thread (see the module's
    docstring), with the default options. ``tokenizer``: a callable returning the
    checkpoint's tokenizer (shared with the load). None where it does not apply: not CUDA, turned off
    by ``DYCOKE_WARM_ANSWER=0``, or too little free memory next to the ``bytes_to_load`` the real
    model still needs. The caller builds no model until ``wait_built`` returns."""
    if device.type != "cuda" or not switch(WARM_ANSWER_ENV, default=True):
        return None
    try:
        shallow = shallow_config(config, _text_layers())
        free, _ = torch.cuda.mem_get_info(device)
        if free < shallow_bytes(shallow, dtype) + bytes_to_load + MARGIN_BYTES:
            return None
    except Exception:  # an unusual configuration: no warm answer
        return None
    built = threading.Event()

    def build_and_answer() -> None:
        try:
            model = build_shallow_model(shallow, device, dtype)
        finally:
            built.set()
        answer_once(model, device=device, dtype=dtype, tokenizer=tokenizer(), preprocess=preprocess, source=source)

    def run() -> None:
        with contextlib.suppress(Exception):
            build_and_answer()
        # the shallow model is out of scope now: its memory goes back to the GPU, not into torch's cache
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()

    thread = threading.Thread(target=run, name="dycoke-warm-answer", daemon=True)
    with _LOCK:
        _THREADS.append(thread)
    thread.start()
    return WarmAnswer(thread, built)


def wait_for_warm_answer() -> None:
    """Wait for a running warm answer (not from inside it): before a video's stages and before any CUDA
    graph capture (``StaticGreedyDecoder``), which another thread's allocations would break."""
    with _LOCK:
        pending = [t for t in _THREADS if t is not threading.current_thread()]
        for thread in pending:
            _THREADS.remove(thread)
    for thread in pending:
        thread.join()


def build_shallow_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """The model of ``config`` (changed: SDPA attention) on ``device`` in ``dtype``, its weights random.

    The plain constructor, never ``from_pretrained``; with the config's dtype unset (``shallow_config``)
    transformers changes no process-wide default dtype for its sub-models. The weights are then cast
    and filled here, whatever the constructor's initialisation did."""
    from transformers import LlavaOnevisionForConditionalGeneration

    config._attn_implementation = "sdpa"
    with torch.device(device):
        model: Any = LlavaOnevisionForConditionalGeneration(config)
    model.to(dtype=dtype).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.normal_(0.0, 0.02)
    return model


def answer_once(
    model: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tokenizer: Any,
    preprocess: Any,
    source: str,
) -> None:
    """Answer one question about ``synthetic_clip()`` with ``model``, the default method, four tokens,
    without a CUDA graph."""
    from dycoke.config import needs_vision_signals, run_options
    from dycoke.model import LoadedModel
    from dycoke.pipeline import VideoQA

    loaded = LoadedModel(model, tokenizer, preprocess, source, device, dtype, random_weights=True)
    qa = VideoQA(loaded)
    options = run_options(None, max_new_tokens=4, min_new_tokens=4, decoder="static")
    prepared = qa.prepare(synthetic_clip(), options.video, with_signals=needs_vision_signals([options.method.method]))
    qa.answer(prepared, "Describe the video.", options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_clip(count: int = CLIP_FRAMES, height: int = CLIP_HEIGHT, width: int = CLIP_WIDTH) -> Any:
    """A decoded clip of ``count`` (height, width) RGB frames: smooth gradients that drift a little each
    frame, compressible like a real clip (unlike noise)."""
    import numpy as np

    from dycoke.reading import DecodedVideo
    from dycoke.video import VideoFrames

    # built in uint8 arithmetic from one gradient (float frames took 0.28 s on the GPU machine, all of
    # it on the critical path of a fresh ``ask``)
    rows = np.linspace(0, 127, height).astype(np.uint8)[:, None]
    cols = np.linspace(0, 127, width).astype(np.uint8)[None, :]
    # (count, height, width): each frame the gradient plus its index (wrapping past 255: still smooth
    # almost everywhere)
    gray = (rows + cols)[None] + np.arange(count, dtype=np.uint8)[:, None, None]
    pixels = np.repeat(gray[..., None], 3, axis=-1)
    frames = VideoFrames(
        frames=pixels,
        indices=list(range(count)),
        timestamps_s=[float(i) for i in range(count)],
        source_fps=1.0,
        source_num_frames=count,
        duration_s=float(count),
        source_size=(height, width),
        decoded_size=(height, width),
    )
    return DecodedVideo(frames=frames, path="warm-up", decode_s=0.0)


def _text_layers() -> int:
    """Layers the shallow model needs for the default method options' layers."""
    from dycoke.config import MethodOptions

    options = MethodOptions()
    return max(TEXT_LAYERS, options.prune_layer + 1, options.fastv_layer + 1)
