"""transformers' model-package index kept on disk: the seeded ``transformers.models`` is the module
transformers builds itself, the file is read (not rebuilt) by later processes, a damaged or stale one is
rebuilt, and nothing breaks where the cache cannot be written. Fresh processes, since the module can
only be seeded before anything imports it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dycoke.transformers_index import _read, _write, index_key

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import dycoke.pipeline  # our import path: the index is seeded before transformers' model code
from transformers.models.llava_onevision import LlavaOnevisionForConditionalGeneration
models = sys.modules["transformers.models"]
print(json.dumps({
    "seeded_from": getattr(models, "dycoke_index", None),
    "modules": sorted(models._modules),
    "classes": sorted(models._class_to_module.items()),
    "model_class": LlavaOnevisionForConditionalGeneration.__name__,
}))
"""


def probe(cache: Path, **env: str) -> dict:
    environment = {**os.environ, "DYCOKE_CACHE_DIR": str(cache), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=environment, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_seeded_module_is_the_one_transformers_builds_and_later_processes_read_the_file(tmp_path: Path) -> None:
    plain = probe(tmp_path / "off", DYCOKE_MODEL_INDEX="0")
    assert plain["seeded_from"] is None and not (tmp_path / "off").exists()
    first = probe(tmp_path / "cache")
    files = list((tmp_path / "cache").glob("transformers-model-index-*.json"))
    assert len(files) == 1 and first["seeded_from"] == str(files[0])
    assert first["modules"] == plain["modules"] and first["classes"] == plain["classes"]
    assert first["model_class"] == "LlavaOnevisionForConditionalGeneration"

    # a later process takes the index from the file: one model package left out of it shows
    stored = json.loads(files[0].read_text())
    for _, modules in stored:
        for name in [m for m in modules if m.startswith("albert.")]:
            del modules[name]
    files[0].write_text(json.dumps(stored))
    later = probe(tmp_path / "cache")
    assert later["seeded_from"] == str(files[0])
    assert not any(m.startswith("albert.") for m in later["modules"])
    assert any(m.startswith("albert.") for m in plain["modules"])


def test_a_damaged_file_is_rebuilt_and_a_read_only_cache_still_seeds(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = probe(cache)
    path = Path(first["seeded_from"])
    path.write_text("{not json")
    again = probe(cache)
    assert again["seeded_from"] == str(path) and again["modules"] == first["modules"]
    assert _read(path) is not None
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        unwritable = probe(locked / "sub")
    finally:
        locked.chmod(0o700)
    if os.geteuid() != 0:  # root writes anywhere: then the file exists, and that is fine too
        assert not (locked / "sub").exists()
    assert unwritable["modules"] == first["modules"] and unwritable["seeded_from"] is not None


def test_the_key_follows_the_version_and_every_model_file(tmp_path: Path) -> None:
    package = tmp_path / "models"
    (package / "one").mkdir(parents=True)
    init = package / "__init__.py"
    init.write_text("")
    source = package / "one" / "modeling_one.py"
    source.write_text("__all__ = ['One']\n")
    key = index_key("5.24.0", str(init))
    assert index_key("5.24.0", str(init)) == key
    assert index_key("5.24.1", str(init)) != key
    source.write_text("__all__ = ['One', 'Two']\n")
    assert index_key("5.24.0", str(init)) != key
    grown = index_key("5.24.0", str(init))
    (package / "two").mkdir()
    (package / "two" / "configuration_two.py").write_text("")
    assert index_key("5.24.0", str(init)) != grown


def test_the_stored_index_reads_back_as_transformers_builds_it(tmp_path: Path) -> None:
    structure = {frozenset(): {"a.configuration_a": {"AConfig"}}, frozenset({"torch"}): {"a.modeling_a": {"A", "B"}}}
    path = tmp_path / "index.json"
    _write(path, structure)
    assert _read(path) == structure
    assert not list(tmp_path.glob("*.tmp"))
    assert _read(tmp_path / "missing.json") is None
