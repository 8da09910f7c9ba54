"""Device and dtype choice, and loading a LLaVA-OneVision checkpoint (hub id or local directory).

Loading is safetensors-only, never runs remote code, and uses SDPA attention. A model too large for
one GPU is spread over all visible GPUs with ``device_map="auto"`` (accelerate).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dycoke.config import ModelOptions
from dycoke.errors import DeviceError, ModelLoadError, OutOfMemoryError
from dycoke.preprocess import PreprocessConfig
from dycoke.weights import WeightPrefetch

if TYPE_CHECKING:
    from dycoke.warm_answer import WarmAnswer

MODEL_TYPE = "llava_onevision"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; check that a requested GPU exists."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' asked for, but no CUDA GPU is available here; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device '{spec}' does not exist: {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device '{spec}' asked for, but MPS is not available here; use --device cpu or auto")
    return device


def execution_device(model: Any) -> torch.device:
    """Where the model's inputs go: the first GPU of a device map (accelerate runs layers offloaded to
    CPU memory there, their weights on the "meta" device meanwhile), else the embedding's device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        gpus = sorted(d for d in device_map.values() if isinstance(d, int) or str(d).startswith("cuda"))
        if gpus:
            first = gpus[0]
            return torch.device("cuda", first) if isinstance(first, int) else torch.device(first)
        return torch.device("cpu")
    return model.get_input_embeddings().weight.device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


@dataclass
class LoadedModel:
    """A loaded checkpoint and what the pipeline needs to drive it."""

    model: Any  # LlavaOnevisionForConditionalGeneration
    tokenizer: Any
    preprocess: PreprocessConfig
    source: str
    device: torch.device  # where inputs go (the embedding's device under a device map)
    dtype: torch.dtype
    random_weights: bool

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame after the 2x2 pooling: ceil(27/2)^2 = 196 for the real models."""
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return int(-(-side // 2)) ** 2

    @property
    def single_device(self) -> bool:
        """Whether every weight sits on one device (not spread by a device map)."""
        return len(set(getattr(self.model, "hf_device_map", {"": 0}).values())) <= 1

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)


def _local_dir(model: str) -> Path | None:
    """The local checkpoint directory ``model`` names, or None for a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]
    if looks_like_path or model.count("/") > 1:
        raise ModelLoadError(
            f"model directory not found: {model}; pass a hub id (e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf) "
            "or an existing checkpoint directory"
        )
    return None


def check_checkpoint_dir(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` holds a LLaVA-OneVision checkpoint in safetensors format."""
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path}; pass a checkpoint directory or a hub id")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a LLaVA-OneVision checkpoint: no config.json in it")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc
    if model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"{path} is not a LLaVA-OneVision checkpoint: config.json has model_type '{model_type}' "
            f"(expected '{MODEL_TYPE}')"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights (only safetensors checkpoints are loaded)")


def load_model(options: ModelOptions, weights: WeightPrefetch | None = None) -> LoadedModel:
    """Load model, tokenizer and preprocessing constants from a hub id or a local directory.

    ``weights``: the checkpoint's tensors being read onto the GPU already (``dycoke.weights``); the
    model is built from them when the read succeeded, else loaded from the files as usual."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    from dycoke.tiny import checkpoint_is_random

    local = _local_dir(options.model)
    if local is not None:
        check_checkpoint_dir(local)
    source = str(local) if local is not None else options.model

    if options.device_map == "auto":
        if not torch.cuda.is_available():
            raise DeviceError("--device-map auto spreads the model over GPUs, but no CUDA GPU is available here")
        device = torch.device("cuda", 0)
    else:
        device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)

    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "attn_implementation": "sdpa"}
    if device.type == "cuda" and options.device_map != "auto":
        kwargs["device_map"] = {"": device}  # weights go straight to the GPU: no CPU copy of the model
    if options.device_map == "auto":
        kwargs["device_map"] = "auto"
        if options.max_gpu_memory is not None:
            kwargs["max_memory"] = _max_memory(options.max_gpu_memory)
    hf_logging.disable_progress_bar()  # the CLI shows its own progress; stderr stays readable
    too_big = (
        f"model '{options.model}' does not fit in the memory of {device}; use a smaller model, "
        "--device-map auto (over several GPUs and CPU memory) or --device cpu"
    )
    one_gpu = device.type == "cuda" and options.device_map != "auto"
    config = _local_config(source) if one_gpu or weights is not None else None
    warm: WarmAnswer | None = None
    if one_gpu and config is not None:
        from dycoke.decoding.kernels import compile_in_background
        from dycoke.warmup import start_warming

        # the fused step's kernels compile (or load from Triton's disk cache) and the GPU libraries
        # make their first calls while the weights load (both already started by a read-ahead)
        compile_in_background(getattr(config, "text_config", config), device, dtype)
        start_warming(device, dtype)
        warm = _start_warm_answer(config, local, device, dtype, weights) if local is not None else None
    tensors = weights.take() if weights is not None else None  # the prefetch holds none of them now
    if warm is not None:
        warm.wait_built()  # two model builds never run at once (dycoke.warm_answer)
    if config is None:
        tensors = None  # no configuration to build with: freed before the plain load
    try:
        if tensors is not None:
            model, tokenizer = _from_state_dict(source, config, tensors, kwargs)
        else:
            model, tokenizer = _from_pretrained(source, kwargs, hub=local is None)
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemoryError(too_big) from exc
    except (OSError, ValueError, SafetensorError) as exc:  # missing, unreadable or damaged files
        where = source if local is not None else f"the Hugging Face hub or the local cache ({_hf_cache()})"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"could not load model '{options.model}' from {where}: {reason}; pass --model DIR with a downloaded "
            "checkpoint, or build a random test one with `dycoke make-tiny-model DIR`"
        ) from exc
    if options.device_map == "auto":
        device = execution_device(model)
    elif device.type != "cuda":  # loaded on the CPU; another device (mps) gets it now
        try:
            model.to(device)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemoryError(too_big) from exc
    model.eval()
    preprocess = PreprocessConfig.from_pretrained_dir(local) if local is not None else _hub_preprocess(source)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        source=source,
        device=device,
        dtype=dtype,
        random_weights=checkpoint_is_random(model.config),
    )


def _start_warm_answer(
    config: Any, local: Path, device: torch.device, dtype: torch.dtype, weights: WeightPrefetch | None
) -> WarmAnswer | None:
    """A shallow copy of the model answers once on a thread while this one builds the model
    (``dycoke.warm_answer``); it shares the tokenizer with the load."""
    from dycoke.warm_answer import start_warm_answer
    from dycoke.weights import weight_bytes

    try:
        # all of the weights, even when read ahead: the read may still be under way, and counting what is
        # already on the GPU twice only errs on the side of room (the read-ahead measured them already)
        to_load = weights.weight_bytes if weights is not None else weight_bytes(local, dtype)
        preprocess = PreprocessConfig.from_pretrained_dir(local)
    except Exception:  # unreadable files: the load reports them
        return None
    return start_warm_answer(
        config,
        device=device,
        dtype=dtype,
        tokenizer=lambda: tokenizer_of(str(local)),
        preprocess=preprocess,
        source=str(local),
        bytes_to_load=to_load,
    )


_TOKENIZERS: dict[tuple[Any, ...], Any] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_of(source: str) -> Any:
    """The tokenizer of local checkpoint ``source``, loaded once per process while its files are
    unchanged (the warm answer's thread and the load share it)."""
    from transformers import AutoTokenizer

    stats = [(f.name, f.stat()) for f in sorted(Path(source).glob("tokenizer*"))]
    key = (source, tuple((name, st.st_mtime_ns, st.st_size) for name, st in stats))
    with _TOKENIZER_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(source, local_files_only=True)
        return _TOKENIZERS[key]


def _local_config(source: str) -> Any:
    """The checkpoint's configuration when it is on this machine, else None (never fetched: an offline
    hub id costs no network retries for it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None


def _max_memory(per_gpu: str) -> dict[int | str, str | int]:
    """accelerate's ``max_memory``: ``per_gpu`` on every visible GPU, the rest in the free CPU memory."""
    import psutil

    budget: dict[int | str, str | int] = {index: per_gpu for index in range(torch.cuda.device_count())}
    budget["cpu"] = int(psutil.virtual_memory().available * 0.9)
    return budget


def _from_state_dict(
    source: str, config: Any, tensors: dict[str, torch.Tensor], kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """Model built from the already-read ``tensors`` of the local checkpoint ``source`` (``config``), and
    its tokenizer. The model keeps the tensors it can use as they are; any the build copied are freed
    afterwards."""
    from transformers import LlavaOnevisionForConditionalGeneration

    files_free = {k: v for k, v in kwargs.items() if k != "use_safetensors"}  # no files to choose from
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=tensors, **files_free
    )
    tensors.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the read copies' memory back to the GPU, not kept in torch's cache
    return model, tokenizer_of(source)


def _from_pretrained(source: str, kwargs: dict[str, Any], *, hub: bool) -> tuple[Any, Any]:
    """Model and tokenizer; a hub id is read from the local cache first, the network only if reachable."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    def load(local_only: bool) -> tuple[Any, Any]:
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(source, local_files_only=local_only, **kwargs)
        return model, AutoTokenizer.from_pretrained(source, local_files_only=local_only)

    if not hub:
        return load(local_only=True)
    try:
        return load(local_only=True)
    except OSError as cache_miss:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not _hub_reachable():
            raise OSError(
                f"it is not in the local cache and the hub ({_hub_endpoint()}) cannot be reached"
            ) from cache_miss
    return load(local_only=False)


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens quickly (avoids minutes of retries when offline)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(_hub_endpoint())
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _hf_cache() -> str:
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"


def _hub_preprocess(repo_id: str) -> PreprocessConfig:
    """Preprocessing constants of a hub checkpoint (the llava-hf defaults when its files are unreachable)."""
    from huggingface_hub import hf_hub_download

    online = os.environ.get("HF_HUB_OFFLINE", "0") in ("", "0") and _hub_reachable()
    for local_only in (True, False) if online else (True,):
        for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
            try:
                path = hf_hub_download(repo_id, name, local_files_only=local_only)
            except Exception:  # absent from the repo or the cache: try the next file, then the defaults
                continue
            return PreprocessConfig.from_pretrained_dir(Path(path).parent)
    return PreprocessConfig()
