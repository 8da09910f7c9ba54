"""Fresh processes that see only what ``pip install dycoke`` installs.

A machine set up for ML work often holds packages that dycoke never asks for (scipy, torchvision,
scikit-learn, pandas), and transformers imports some of them when they are there: on the H200
machine, its model code pulled in ``scipy.optimize`` (0.30 s) and ``torchvision`` (0.18 s) through its
loss functions, which a user's fresh install of dycoke would not have. ``hiding_environment`` runs a
child as that install would: every top-level module of an installed distribution outside the
dependency closure of ``pyproject.toml`` (its dependencies, theirs, and so on, environment markers
evaluated, no extras) is marked absent in ``sys.modules`` before anything imports (a
``sitecustomize`` on ``PYTHONPATH``), so ``import scipy`` fails and transformers' availability checks
say no. ``--hide NAME`` adds modules for experiments (``triton``: what its import costs a start).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    """A distribution name as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure(pyproject: Path = ROOT / "pyproject.toml") -> set[str]:
    """The installed distributions that ``pip install`` of ``pyproject`` pulls in (canonical names):
    the project itself and its dependencies, recursively, markers evaluated here, extras left out."""
    import tomllib  # Python 3.11 on (the benchmarks' machines have it)

    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = project["dependencies"]
    found: set[str] = {canonical(project["name"])}
    pending = [Requirement(text) for text in wanted]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonical(requirement.name)
        if name in found:
            continue
        try:
            distribution = importlib.metadata.distribution(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.add(name)
        pending += [Requirement(text) for text in distribution.requires or []]
    return found


def undeclared_modules(closure: set[str]) -> list[str]:
    """Top-level modules of installed distributions that are not in ``closure`` (modules no
    distribution provides, such as this repository's own, are left alone)."""
    provided = importlib.metadata.packages_distributions()
    return sorted(
        module
        for module, distributions in provided.items()
        if module.isidentifier() and not any(canonical(d) in closure for d in distributions)
    )


def hiding_environment(modules: list[str], folder: Path) -> dict[str, str]:
    """Environment additions under which a child Python sees ``modules`` as not installed: a
    ``sitecustomize.py`` written into ``folder`` and put first on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ", ".join(repr(m) for m in sorted(set(modules)))
    (folder / "sitecustomize.py").write_text(
        '"""Written by benchmarks/installed.py: these modules count as not installed."""\n'
        "import sys\n\n"
        f"for _name in ({names},):\n"
        "    sys.modules.setdefault(_name, None)\n"
    )
    path = [str(folder.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}
