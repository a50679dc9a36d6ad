"""Configuration: `CompilationConfig` (what the user chose and what follows from it), its checks,
JSON I/O and overrides, `PassConfig`, and the two mode enums. No torch import: `kiln config …`
starts fast."""

from kiln.workers.config.checks import CAPTURE_SIZES_PLACEHOLDER, DEFAULT_CAPTURE_SIZES
from kiln.workers.config.compilation_config import DEFAULT_SPLITTING_OPS, CompilationConfig
from kiln.workers.config.json_io import ConfigError
from kiln.workers.config.modes import CompilationLevel, CUDAGraphMode
from kiln.workers.config.pass_config import PassConfig

__all__ = [
    "CAPTURE_SIZES_PLACEHOLDER",
    "DEFAULT_CAPTURE_SIZES",
    "DEFAULT_SPLITTING_OPS",
    "CompilationConfig",
    "CompilationLevel",
    "ConfigError",
    "CUDAGraphMode",
    "PassConfig",
]
