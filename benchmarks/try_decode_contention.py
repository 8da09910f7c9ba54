"""Experiment: what beside a video's decode slows it down (CUDA machine)?

Encoding frames on the GPU while the reader threads decode the rest ran the decode about twice as long
(``e2e-h200-encode-while-decoding-tried.json``). Here the decode of ``--frames`` frames runs alone, then
beside one other thread doing one kind of work in a loop until the decode ends:

- ``encode-sync``: the vision encoder on 16 frames already on the GPU, ``torch.cuda.synchronize()``
  after each (the device-wide wait, which spins a core);
- ``encode-event``: the same, waiting on a blocking CUDA event instead (the thread sleeps);
- ``encode-nosync``: the same, launching only (at most 4 encodes in flight);
- ``python``: a pure Python loop (holds the GIL, no GPU);
- ``upload``: 16 decoded-size frames gathered on the CPU and copied to the GPU (pageable memory);
- ``spin``: ``torch.cuda.synchronize()`` on an idle GPU in a loop.

    python benchmarks/try_decode_contention.py --frames 128 --repeats 3 \\
        --out benchmarks/results/decode-contention-h200.json

Random weights at the 0.5B shape (its vision tower is the 7B's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_methods import build, environment
from dycoke.config import VideoOptions
from dycoke.preprocess import preprocess_frames
from dycoke.reading import decode_video
from dycoke.vision import encode_frames


def loads(qa: Any, frames: Any) -> dict[str, Callable[[], None]]:
    loaded = qa.loaded
    pixels = preprocess_frames(frames[:16], loaded.preprocess, device=loaded.device, dtype=loaded.dtype)
    host = torch.from_numpy(frames)
    index = torch.arange(16) * 3 % host.shape[0]
    in_flight: list[torch.cuda.Event] = []

    def encode() -> None:
        with torch.inference_mode():
            encode_frames(loaded.model, pixels, loaded.tokens_per_frame)

    def encode_sync() -> None:
        encode()
        torch.cuda.synchronize()

    def encode_event() -> None:
        encode()
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()

    def encode_nosync() -> None:
        encode()
        event = torch.cuda.Event(blocking=True)
        event.record()
        in_flight.append(event)
        if len(in_flight) > 4:
            in_flight.pop(0).synchronize()

    def python() -> None:
        total = 0
        for i in range(100_000):
            total += i

    def upload() -> None:
        host.index_select(0, index).to(loaded.device)

    return {
        "encode-sync": encode_sync,
        "encode-event": encode_event,
        "encode-nosync": encode_nosync,
        "python": python,
        "upload": upload,
        "spin": torch.cuda.synchronize,
    }


def decode_beside(video: str, options: VideoOptions, work: Callable[[], None] | None) -> dict[str, float]:
    """Seconds of the decode with ``work`` looping on another thread, and how many loops ran."""
    done = threading.Event()
    loops = [0]

    def loop() -> None:
        while not done.is_set():
            assert work is not None
            work()
            loops[0] += 1

    thread = threading.Thread(target=loop) if work is not None else None
    if thread is not None:
        thread.start()
    decoded = decode_video(video, options)
    done.set()
    if thread is not None:
        thread.join()
    torch.cuda.synchronize()
    return {"decode_s": decoded.decode_s, "loops": loops[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    qa = build("0.5b")
    options = VideoOptions(num_frames=args.frames)
    frames = decode_video(args.video, options).frames.frames  # warm: file cache, codecs
    kinds = loads(qa, frames)
    for work in kinds.values():
        work()  # warm: kernels, allocator
    torch.cuda.synchronize()
    runs: dict[str, list[dict[str, float]]] = {"alone": [], **{k: [] for k in kinds}}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(decode_beside(args.video, options, kinds.get(name)))
    rows = [
        {
            "beside": name,
            "decode_s_median": statistics.median(r["decode_s"] for r in found),
            "decode_s": [r["decode_s"] for r in found],
            "loops": [r["loops"] for r in found],
        }
        for name, found in runs.items()
    ]
    result = {**environment(), "frames": args.frames, "video": args.video, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['beside']:>14}: {1000 * row['decode_s_median']:7.0f} ms  loops {row['loops']}")


if __name__ == "__main__":
    main()
