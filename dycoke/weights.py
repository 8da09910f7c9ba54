"""Read a local checkpoint's weights onto the GPU while transformers' model code is still importing.

A fresh ``dycoke ask`` imports torch, then transformers' model code (4-8 s on the H200 machine:
``modeling_utils`` pulls in ``torch.distributed.tensor``, sympy, ``torch._dynamo``), and only then
reads the weights (about 3 s for 7B from the page cache). Reading safetensors needs torch alone, so a
thread started right after ``import torch`` puts every tensor on the GPU in the target dtype during that
import; ``load_model`` then builds the model from them (``from_pretrained(None, config=...,
state_dict=...)``: transformers' own key conversions and tying apply, and the result equals a plain
load, tested). Measured with ``benchmarks/try_overlapped_load.py``: 11.8 s instead of 13.7 s from the
process start to a loaded 7B model (H200).

The prefetch runs only where the GPU has room for two copies of the weights (and a margin), in case
the build copies them; transformers 5 keeps the read tensors as the parameters, no copy (tested on the
CPU, and in bf16 on the H200), so the rule is stricter than the tested path needs. Otherwise, and for
hub ids, device maps and the CPU, the plain load runs as before. Nothing here imports transformers.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO

import torch

from dycoke.config import ModelOptions
from dycoke.switches import switch

PREFETCH_ENV = "DYCOKE_PREFETCH_WEIGHTS"
"""``DYCOKE_PREFETCH_WEIGHTS=0`` turns the read-ahead off (e.g. on a GPU shared with other processes)."""

MARGIN_BYTES = 2 * 2**30
"""Free GPU memory kept beyond twice the weights before a prefetch starts."""


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files ``from_pretrained`` would read: those of ``model.safetensors.index.json``'s
    weight map when the checkpoint is sharded, else ``model.safetensors``, else every ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names and their torch dtypes; floating-point tensors are cast to the model's dtype."""


def _header(handle: BinaryIO) -> tuple[int, dict[str, Any]]:
    """An open safetensors file's (offset of its data, {name: entry}) from its header (``__metadata__`` left out)."""
    (length,) = struct.unpack("<Q", handle.read(8))
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def weight_bytes(folder: Path, dtype: torch.dtype) -> int:
    """Bytes the folder's safetensors tensors take once floating-point ones are cast to ``dtype``
    (read from the files' headers: nothing is loaded)."""
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for file in checkpoint_files(folder):
        with file.open("rb") as handle:
            _, header = _header(handle)
        for entry in header.values():
            stored = _TORCH_DTYPES.get(entry["dtype"])
            begin, end = entry["data_offsets"]
            cast = stored is not None and stored.is_floating_point
            total += math.prod(entry["shape"]) * itemsize if cast else int(end) - int(begin)
    return total


def read_safetensors(file: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file on ``device``, floating-point ones cast to ``dtype``.

    The file is memory-mapped and each tensor copied from the mapping by ``Tensor.to``, which releases
    the GIL while it copies (safetensors' own reader holds it for every byte it copies): the import that
    runs beside this thread keeps the interpreter. Raises on a damaged file (``ValueError``, ``KeyError``,
    ``struct.error``)."""
    with file.open("rb") as handle:
        data_start, header = _header(handle)
        # a private mapping: torch.frombuffer wants a writable buffer, and nothing is ever written
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        stored = _TORCH_DTYPES[entry["dtype"]]
        begin, end = (data_start + int(offset) for offset in entry["data_offsets"])
        count = math.prod(entry["shape"])
        if end - begin != count * stored.itemsize or end > len(mapped):
            raise ValueError(f"{file.name}: tensor {name}'s offsets do not match its shape or the file")
        target = dtype if stored.is_floating_point else stored
        if count == 0:
            tensors[name] = torch.empty(entry["shape"], dtype=target, device=device)
            continue
        view = torch.frombuffer(mapped, dtype=stored, count=count, offset=begin).view(entry["shape"])
        # a copy even where nothing changes (same device and dtype): the mapping must not outlive the read
        tensors[name] = view.to(device, target, copy=True)
    return tensors


class WeightPrefetch:
    """Every tensor of a local safetensors checkpoint, read onto ``device`` in ``dtype`` on a thread.

    On CUDA the thread first initialises CUDA (off the importing main thread), starts the fused decode
    step's kernel compile (``kernels.compile_for_checkpoint``) and the GPU libraries' first calls
    (``warmup.start_warming``), both of which then run during the import too, and
    checks that the GPU has room for the read copies next to the model's (twice ``weight_bytes``, the
    weights in ``dtype``, plus ``MARGIN_BYTES``); without room it reads nothing and ``take`` returns None,
    so the plain load runs."""

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, weight_bytes: int = 0) -> None:
        self.folder, self.device, self.dtype = folder, device, dtype
        self.weight_bytes = weight_bytes  # the model's weights in ``dtype`` (``weight_bytes``), for later checks
        self._tensors: dict[str, torch.Tensor] | None = None  # set once every tensor is read
        self._thread = threading.Thread(target=self._read, name="dycoke-weights", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        try:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)  # initialises CUDA here, not on the main thread
                from dycoke.decoding.kernels import compile_for_checkpoint
                from dycoke.warmup import start_warming

                compile_for_checkpoint(self.folder / "config.json", self.device, self.dtype)
                start_warming(self.device, self.dtype)
                if 2 * self.weight_bytes + MARGIN_BYTES > free:
                    return
            for file in checkpoint_files(self.folder):
                tensors.update(read_safetensors(file, self.device, self.dtype))
        except BaseException:  # what was read is dropped; the plain load then runs and says what is wrong
            return
        self._tensors = tensors

    def take(self) -> dict[str, torch.Tensor] | None:
        """Wait for the read; the tensors (handed over once: later calls get None), or None if it failed."""
        self._thread.join()
        tensors, self._tensors = self._tensors, None
        return tensors


def prefetch_weights(options: ModelOptions) -> WeightPrefetch | None:
    """Start reading ``options.model``'s weights onto its GPU when that helps and fits: a local
    safetensors checkpoint, one CUDA device (no device map), free memory for twice the weights plus
    :data:`MARGIN_BYTES`, and not turned off by ``DYCOKE_PREFETCH_WEIGHTS=0``. None otherwise (and on
    any doubt): the plain load then runs."""
    from dycoke.model import resolve_device, resolve_dtype

    if not switch(PREFETCH_ENV, default=True):
        return None
    folder = Path(options.model).expanduser()
    if options.device_map == "auto" or not (folder / "config.json").is_file():
        return None
    if not any(folder.glob("*.safetensors")) or not torch.cuda.is_available():
        return None
    try:
        device = resolve_device(options.device)
        if device.type != "cuda":
            return None
        dtype = resolve_dtype(options.dtype, device)
        size = weight_bytes(folder, dtype)
    except Exception:  # an unusual checkpoint or device: leave it to the plain load and its errors
        return None
    return WeightPrefetch(folder, device, dtype, size)
