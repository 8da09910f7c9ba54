"""What reading frames into page-locked memory (``dycoke.pinned_frames``) saves on their way to the GPU,
and what it costs.

In a fresh process (CUDA initialised first, as a loaded model has it): page-locked memory of the
frames' size from torch's pinned allocation (its caching host allocator has none yet) and from
``lock_block`` (several threads fault the memory in, then ``cudaHostRegister``), each then written
once; then, medians of ``--repeats`` with the device synchronised: a read into ordinary memory and
into a block of the pool, the upload of each, and ``preprocess_frames`` (upload, resize, normalise)
from each.

    python benchmarks/try_pinned_frames.py --frames 128 --out benchmarks/results/pinned-frames-h200.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke.pinned_frames import BlockPool, PinnedFrames, lock_block
from dycoke.preprocess import PreprocessConfig, preprocess_frames
from dycoke.video import read_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", default="samples/bigbuckbunny.mp4")
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [f"# {' '.join(['python', *sys.argv])}", f"# {torch.cuda.get_device_name()}, torch {torch.__version__}"]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    shape = read_video(args.video, num_frames=1).frames.shape[1:]
    nbytes = args.frames * int(np.prod(shape))
    for name, lock in (
        ("torch's pinned allocation", lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()),
        ("lock_block", lambda: lock_block(nbytes)),
    ):
        started = time.perf_counter()
        block = lock()
        took = time.perf_counter() - started
        say(f"{name}, {nbytes / 2**20:.0f} MiB: {1000 * took:.1f} ms")
        started = time.perf_counter()
        block[:] = 1
        say(f"  its first write: {1000 * (time.perf_counter() - started):.1f} ms")
        del block
    pool = BlockPool()
    started = time.perf_counter()
    read_video(args.video, num_frames=args.frames, sink=PinnedFrames(pool))
    took = time.perf_counter() - started
    say(f"a first read into page-locked memory, its block locked meanwhile: {1000 * took:.1f} ms")

    def timed(name: str, work: Callable[[], object]) -> None:
        work()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            work()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        say(f"{name}: median {1000 * statistics.median(times):.1f} ms")

    config = PreprocessConfig()
    plain = read_video(args.video, num_frames=args.frames).frames
    timed("read into ordinary memory", lambda: read_video(args.video, num_frames=args.frames))
    sink = PinnedFrames(pool)
    timed("read into page-locked memory", lambda: read_video(args.video, num_frames=args.frames, sink=sink))
    pinned = read_video(args.video, num_frames=args.frames, sink=sink).frames
    assert torch.from_numpy(pinned).is_pinned()
    timed("upload from ordinary memory", lambda: torch.as_tensor(plain).to("cuda"))
    timed("upload from page-locked memory", lambda: torch.as_tensor(pinned).to("cuda", non_blocking=True))
    timed("preprocess from ordinary memory", lambda: preprocess_frames(plain, config, device="cuda"))
    timed("preprocess from page-locked memory", lambda: preprocess_frames(pinned, config, device="cuda"))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
