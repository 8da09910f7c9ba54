"""Equal-budget controls: which visual tokens a random or a frame-uniform choice keeps (math only).

Later papers found that at an equal token budget several pruning methods barely beat a random choice;
these two controls make that comparison one flag away. Both keep tokens in raster order.

- ``random``: a seeded uniform choice of ``count`` tokens among the F*T frame tokens.
- ``uniform``: fewer frames, evenly spaced: ``round(count / T)`` of the F frames (at least 1), chosen
  with the paper's sampling rule ``linspace(0, F-1, F')`` truncated, every token of each.
"""

from __future__ import annotations

import torch

from dycoke.errors import ConfigError


def random_token_indices(total: int, count: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """(count,) ascending indices of a seeded uniform choice without replacement among ``total``.

    The choice depends on (total, count, seed) only, never on the device: it is drawn on the CPU.
    """
    if not 1 <= count <= total:
        raise ConfigError(f"token budget must be in [1, {total}] frame tokens, got {count}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(total, generator=generator)[:count].sort().values
    return chosen.to(device) if device is not None else chosen


def uniform_frame_indices(num_frames: int, tokens_per_frame: int, count: int) -> list[int]:
    """The frames kept for a budget of ``count`` tokens: ``round(count / T)`` frames (1..F), evenly spaced."""
    if count < 1:
        raise ConfigError(f"token budget must be a positive number of tokens, got {count}")
    kept = min(num_frames, max(1, round(count / tokens_per_frame)))
    if kept == 1:
        return [0]
    step = (num_frames - 1) / (kept - 1)  # numpy.linspace's arithmetic, truncated, last point exact
    return [int(i * step) for i in range(kept - 1)] + [num_frames - 1]
