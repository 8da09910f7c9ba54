"""Grouping profiled CUDA kernels by family (GEMM, attention, ...) for the profiling scripts."""

from __future__ import annotations

from collections.abc import Sequence

Families = Sequence[tuple[str, Sequence[str]]]
"""(label, substrings of a kernel's lower-cased name) pairs, the first match winning."""


def kernel_family(name: str, families: Families) -> str:
    """The label of the first family one of whose substrings the kernel's name contains, else "other"."""
    lowered = name.lower()
    for label, needles in families:
        if any(n in lowered for n in needles):
            return label
    return "other"
