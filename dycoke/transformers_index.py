"""transformers' index of its model packages, built once and kept on disk.

Importing transformers' model code imports the package ``transformers.models``, whose ``__init__``
builds an index of every model package for its lazy imports: it reads the 1,600-odd source files of
its 560 model folders and parses their ``__all__`` (``define_import_structure``). That took 0.36-0.44 s
of every fresh process on the 2-core CI machine and 0.44 s on the H200 machine (``python -X
importtime``), the largest single import of ``dycoke ask``'s start-up after torch.

``seed_model_index`` builds the same lazy module from the same index, read from a file the first
process wrote (``~/.cache/dycoke``, or ``$DYCOKE_CACHE_DIR``; JSON), keyed by the transformers version and
the files' count, sizes and modification times (14 ms to check): a changed or reinstalled
transformers builds a new one. Anything unexpected (another transformers layout, an unreadable or
damaged file, a read-only cache folder) falls back to transformers' own import; ``DYCOKE_MODEL_INDEX=0``
turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from dycoke.switches import switch

INDEX_ENV = "DYCOKE_MODEL_INDEX"
CACHE_ENV = "DYCOKE_CACHE_DIR"
PACKAGE = "transformers.models"


def cache_dir() -> Path:
    """Where dycoke keeps files between processes: ``$DYCOKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dycoke``,
    else ``~/.cache/dycoke``."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "dycoke"


def index_key(version: str, init_file: str) -> str:
    """A digest of the transformers version, the package's location and every model source file's
    size and modification time (count, sum of sizes, latest time)."""
    count = total = latest = 0
    for folder in os.scandir(os.path.dirname(init_file)):
        if not folder.is_dir(follow_symlinks=False):
            continue
        for entry in os.scandir(folder.path):
            if entry.name.endswith(".py"):
                stat = entry.stat()
                count, total, latest = count + 1, total + stat.st_size, max(latest, stat.st_mtime_ns)
    text = f"{version}|{init_file}|{count}|{total}|{latest}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def seed_model_index() -> bool:
    """Put ``transformers.models`` into ``sys.modules`` from the index on disk (written here first if
    missing), before anything imports it. True when seeded; False when it was imported already, is
    turned off, or anything failed (transformers then imports it as usual)."""
    if PACKAGE in sys.modules or not switch(INDEX_ENV, default=True):
        return False
    try:
        return _seed()
    except Exception:
        return False


def _seed() -> bool:
    import transformers
    from transformers.utils import _LazyModule
    from transformers.utils.import_utils import define_import_structure

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return False
    path = cache_dir() / f"transformers-model-index-{index_key(transformers.__version__, spec.origin)}.json"
    structure = _read(path)
    if structure is None:
        structure = define_import_structure(spec.origin)
        _write(path, structure)
    module = _LazyModule(PACKAGE, spec.origin, structure, module_spec=spec)
    setattr(module, "dycoke_index", str(path))  # noqa: B010 (where it came from: tests, and anyone wondering)
    if PACKAGE in sys.modules:  # another thread imported it meanwhile: keep that one
        return False
    sys.modules[PACKAGE] = module
    return True


def _read(path: Path) -> Any:
    """The index stored at ``path`` ({backends: {module: names}}, with frozenset keys and set values as
    transformers builds it); None when absent or damaged."""
    try:
        stored = json.loads(path.read_text())
        return {frozenset(backends): {m: set(names) for m, names in modules.items()} for backends, modules in stored}
    except Exception:
        return None


def _write(path: Path, structure: Any) -> None:
    """Store ``structure`` at ``path`` as JSON, atomically (a reader never sees half a file); silent on
    failure (the next process builds it again)."""
    stored = [[sorted(keys), {m: sorted(names) for m, names in mods.items()}] for keys, mods in structure.items()]
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump(stored, f)
        os.replace(temporary, path)
    except Exception:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
