"""Environment switches: the ``DYCOKE_*`` variables that turn a mechanism on or off (standard library only)."""

from __future__ import annotations

import os

_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def switch(name: str, default: bool) -> bool:
    """Environment variable ``name`` read as on (1, true, yes, on) or off (0, false, no, off), in any case
    and with spaces ignored; ``default`` when it is unset or says anything else."""
    value = os.environ.get(name, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    return default
