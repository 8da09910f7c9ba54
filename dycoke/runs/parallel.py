"""Data-parallel batch runs: N processes (``accelerate launch`` or ``torchrun``) share one questions
file and one output.

Each process answers a disjoint share of the videos (a video's questions stay together, so its
decode, encode and shared prefix are never repeated) and writes its records to its own part file
next to the output. Process 0 first merges any parts an interrupted run left behind, so every process
starts from the same finished set; at the end it waits for every process's ``.done`` marker and merges
the parts into the output. A crash or Ctrl-C leaves the parts on disk: the rerun merges them, nothing
is lost, nothing answered twice. The output folder must be shared by all processes (all machines).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dycoke.config import Method
from dycoke.errors import ConfigError
from dycoke.runs.batch import BatchSummary, Question, grade, group_by_video
from dycoke.runs.results import ResultWriter, merge_parts, part_path, part_paths, read_records, record_key


@dataclass
class Shard:
    """This process's place in a data-parallel run (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    state: Any = None  # accelerate's PartialState when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def current_shard(use_cpu: bool) -> Shard:
    """Read the launcher's environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``) through accelerate.

    ``use_cpu`` selects the gloo backend (CPU processes); otherwise NCCL, one GPU per process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    from accelerate import PartialState

    state = PartialState(cpu=use_cpu)
    return Shard(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index, state=state)


def process_device(device: str, device_map: str | None, shard: Shard, cuda_available: bool) -> str:
    """The device of this process: with several processes on CUDA, one GPU each (``cuda:LOCAL_RANK``)."""
    if shard.world == 1:
        return device
    if device_map is not None:
        raise ConfigError(
            f"--device-map {device_map} spreads one model over every GPU and cannot be combined with "
            f"{shard.world} data-parallel processes; run one process, or drop --device-map"
        )
    if device == "cpu" or (device == "auto" and not cuda_available):
        return "cpu"
    if device not in ("auto", "cuda"):
        raise ConfigError(f"--device {device} names one GPU; with {shard.world} processes use auto or cuda")
    return f"cuda:{shard.local_rank}"


def assign(
    questions: list[Question], methods: list[Method], done: set[tuple[str, str]], world: int
) -> list[list[Question]]:
    """Split the unanswered questions into ``world`` shares of whole videos, balanced by work.

    Deterministic (every process computes the same split): videos by decreasing pending work, each
    to the least-loaded share, ties to the lower rank.
    """
    loads = [0] * world
    shares: list[list[Question]] = [[] for _ in range(world)]
    work = []
    for order, group in enumerate(group_by_video(questions)):
        pending = sum(1 for q in group for m in methods if (q.id, m) not in done)
        if pending:
            work.append((pending, order, group))
    for pending, _, group in sorted(work, key=lambda w: (-w[0], w[1])):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += pending
        shares[rank].extend(group)
    return shares


def marker_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}.done")


def mark_done(output: Path, rank: int) -> None:
    marker_path(output, rank).write_text("done\n")


def clear_markers(output: Path) -> None:
    for path in output.parent.glob(f"{output.name}.part-*.done"):
        path.unlink(missing_ok=True)


def wait_for_markers(output: Path, world: int, poll_s: float = 0.5) -> None:
    """Block until every process has written its ``.done`` marker (a file, not a collective: a share
    may take hours longer than another without hitting a communication timeout)."""
    while not all(marker_path(output, r).exists() for r in range(world)):
        time.sleep(poll_s)


ShareRunner = Callable[[list[Question], ResultWriter], BatchSummary]


def run_sharded(
    questions: list[Question],
    methods: list[Method],
    output: str | Path,
    shard: Shard,
    answer_share: ShareRunner,
    *,
    overwrite: bool = False,
) -> BatchSummary:
    """Run a batch as process ``shard.rank`` of ``shard.world``; ``answer_share`` answers this
    process's questions into the writer it is given (``run_batch`` with a loaded model).

    Alone (world 1) the records go straight to the output. Returns this process's summary; on
    process 0 of several, the summary of the whole merged output.
    """
    output = Path(output)
    ResultWriter.check_path(output)
    start = time.perf_counter()
    if shard.is_main:
        if overwrite:
            for path in [output, *part_paths(output)]:
                path.unlink(missing_ok=True)
        merge_parts(output)
        clear_markers(output)
    shard.barrier()
    if shard.world == 1:
        with ResultWriter(output) as writer:
            return answer_share(questions, writer)

    done = finished(output)
    share = assign(questions, methods, done, shard.world)[shard.rank]
    with ResultWriter(part_path(output, shard.rank), overwrite=True) as writer:
        writer.done |= done
        summary = answer_share(share, writer)
    mark_done(output, shard.rank)
    if not shard.is_main:
        return summary
    wait_for_markers(output, shard.world)
    merge_parts(output)
    clear_markers(output)
    return summarize_output(output, questions, methods, already_done=len(done), seconds=time.perf_counter() - start)


def finished(output: Path) -> set[tuple[str, str]]:
    """(id, method) of every successful record in ``output``."""
    records, _ = read_records(output)
    return {record_key(r) for r in records if not r.get("error")}


def summarize_output(
    output: Path, questions: list[Question], methods: list[Method], *, already_done: int, seconds: float
) -> BatchSummary:
    """The summary of a whole run, read back from its merged output."""
    wanted = {(q.id, m) for q in questions for m in methods}
    summary = BatchSummary(total=len(wanted), already_done=already_done, seconds=seconds)
    records, _ = read_records(output)
    for record in records:
        if record_key(record) not in wanted:
            continue
        if record.get("error"):
            summary.failed += 1
        else:
            summary.answered += 1
            grade(summary, record)
    summary.answered -= already_done
    return summary
