"""dycoke: answer questions about videos with LLaVA-OneVision, compressed with DyCoke.

Importing this package is cheap: torch and transformers are imported by the modules that need them.
"""

from dycoke.errors import (
    ConfigError,
    CsvError,
    DeviceError,
    DyCokeError,
    ModelLoadError,
    OutOfMemoryError,
    VideoError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CsvError",
    "DeviceError",
    "DyCokeError",
    "ModelLoadError",
    "OutOfMemoryError",
    "VideoError",
    "__version__",
]
