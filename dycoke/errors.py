"""Typed errors: the one family of exceptions the CLI catches and turns into ``Error: ...``.

Every message is a single line that names the offending value and what is allowed.
"""

from __future__ import annotations


class DyCokeError(Exception):
    """Base class of every error the library raises on purpose (user input, environment)."""


class ConfigError(DyCokeError, ValueError):
    """An option has an impossible value (e.g. ``frames=0``, ``prune_layer`` past the last layer)."""


class VideoError(DyCokeError):
    """The video is missing, unreadable, corrupt, or has no frames in the requested window."""


class ModelLoadError(DyCokeError):
    """The model could not be found or is not a LLaVA-OneVision checkpoint."""


class DeviceError(DyCokeError):
    """The requested device does not exist or is not usable (e.g. CUDA asked for, none present)."""


class OutOfMemoryError(DyCokeError):
    """The device ran out of memory; the message says what to reduce."""


class CsvError(DyCokeError):
    """A questions file is malformed (missing columns, unreadable)."""
