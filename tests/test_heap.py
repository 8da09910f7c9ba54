"""``dycoke.heap``: collection off for a block of imports, then the heap frozen."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from dycoke.heap import freeze_after_start, imports_without_collection


def test_no_collection_inside_the_block_and_the_heap_frozen_after_it() -> None:
    assert gc.isenabled()
    try:
        with imports_without_collection():
            assert not gc.isenabled()
            made = [object() for _ in range(10)]
        assert gc.isenabled() and gc.get_freeze_count() >= len(made)
        gc.disable()  # collection stays as the caller had it
        with imports_without_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_server_freezes_what_it_built_and_frees_its_garbage() -> None:
    class Cycle:
        pass

    try:
        cycle = Cycle()
        cycle.self = cycle  # type: ignore[attr-defined]
        alive = weakref.ref(cycle)
        del cycle  # garbage only a collection frees
        freeze_after_start()
        assert alive() is None  # collected, not frozen
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_loaded_model_leaves_the_heap_frozen(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dycoke import VideoQA
    from dycoke.heap import FREEZE_ENV

    try:
        gc.unfreeze()
        monkeypatch.setenv(FREEZE_ENV, "0")
        VideoQA.load(str(tiny_checkpoint), device="cpu")
        assert gc.get_freeze_count() == 0
        monkeypatch.delenv(FREEZE_ENV)
        VideoQA.load(str(tiny_checkpoint), device="cpu")
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
