"""kiln's driver side: config and hashing, the Orchestrator API, placement, reports, the CLI.

Imports are lazy (PEP 562) so that `kiln cache …` and `kiln config …` start without importing
torch or ray; `from orchestrator import Orchestrator, CompilationConfig` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Orchestrator": "orchestrator.driver",
    "RunReport": "orchestrator.report",
    "CompilationConfig": "workers.config",
    "CompilationLevel": "workers.config",
    "CUDAGraphMode": "workers.config",
    "PassConfig": "workers.config",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.driver import Orchestrator
    from orchestrator.report import RunReport
    from workers.config import CompilationConfig, CompilationLevel, CUDAGraphMode, PassConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
