"""Experiment for the cold start (#15): read the weights onto the GPU while transformers' model code imports.

A fresh ``dycoke ask`` imports torch (the floor), then transformers' model code (about 4-5 s on the H200
machine: ``modeling_utils`` pulls in ``torch.distributed.tensor``, sympy, ``torch._dynamo``), and only
then loads the weights (3.8 s for 7B from the page cache). Safetensors need only torch, so a thread can
put the tensors on the GPU during that import, and ``from_pretrained(None, config=..., state_dict=...)``
then builds the model from them (checked equal to a plain load on a tiny checkpoint, CPU).

Runs each way as fresh processes, alternating, and prints/writes the seconds from the script's first line to a
loaded model, plus peak GPU memory (the preloaded tensors and the model's may coexist for a moment):

    python benchmarks/try_overlapped_load.py --model DIR --repeats 3 --out benchmarks/results/overlapped-load-h200.json

``plain``: import torch, CUDA init, import the model code, ``from_pretrained(DIR)``.
``overlapped``: import torch, CUDA init, start the reading thread, import the model code, wait for the
thread, ``from_pretrained(None, config=..., state_dict=...)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

START = time.time()
ROOT = Path(__file__).resolve().parents[1]


def _read_to_device(folder: str, device: str, dtype: Any) -> dict[str, Any]:
    """Every tensor of the folder's safetensors files, on ``device`` in ``dtype`` (floats only)."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            names = list(handle.keys())  # a safetensors handle is not iterable
            for key in names:
                tensor = handle.get_tensor(key)
                out[key] = tensor.to(device, dtype if tensor.is_floating_point() else tensor.dtype)
    return out


def child(mode: str, model: str, device: str) -> None:
    import threading

    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        torch.cuda.init()
    preloaded: dict[str, Any] = {}
    reader = None
    if mode == "overlapped":
        reader = threading.Thread(target=lambda: preloaded.update(_read_to_device(model, device, dtype)))
        reader.start()
    t_import = time.time()
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    imported = time.time()
    if reader is not None:
        reader.join()
        read = time.time()
        config = AutoConfig.from_pretrained(model)
        loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=preloaded, dtype=dtype, device_map={"": device}
        )
        preloaded.clear()
    else:
        read = imported
        loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(model, dtype=dtype, device_map={"": device})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done = time.time()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del loaded
    print(
        json.dumps(
            {
                "mode": mode,
                "start_to_model_s": done - START,
                "model_code_import_s": imported - t_import,
                "waited_for_reader_s": read - imported,
                "from_pretrained_s": done - read,
                "peak_gpu_gib": peak,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local checkpoint folder (safetensors)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["plain", "overlapped"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.device)
        return
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "overlapped": []}
    for _ in range(args.repeats):
        for mode in runs:
            command = [sys.executable, __file__, "--child", mode, "--model", args.model, "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[mode][-1]), flush=True)
    summary = {
        mode: {"median_start_to_model_s": statistics.median(r["start_to_model_s"] for r in rows)}
        for mode, rows in runs.items()
    }
    print(json.dumps(summary))
    if args.out:
        command = " ".join(["python", *sys.argv])
        args.out.write_text(json.dumps({"command": command, "summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
