"""kiln: compile PyTorch models piecewise on every rank, once, into a shared hash-keyed cache.

The public face. Everything here is imported lazily (PEP 562), so `import kiln` costs nothing
and `kiln cache …` / `kiln config …` start without torch or Ray:

    from kiln import Orchestrator, CompilationConfig, CUDAGraphMode, KilnModel
    torch.compile(model, backend=kiln.backend())    # or backend="kiln"
    compiled = kiln.compile(model)                  # any nn.Module: trace once, split at attention

Installed, the three packages live here: `kiln.orchestrator` (driver), `kiln.workers` (ranks),
`kiln.cache` (the on-disk store), mapped from the repository's top-level folders of those names.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"


def _source_checkout_dirs() -> list[str]:
    """In a source checkout (not installed), orchestrator/, workers/ and cache/ sit beside this
    folder rather than inside it: let `kiln.workers` & co. resolve there."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    inside = all(os.path.isdir(os.path.join(here, name)) for name in ("orchestrator", "workers", "cache"))
    beside = os.path.isfile(os.path.join(root, "pyproject.toml")) and all(
        os.path.isfile(os.path.join(root, name, "__init__.py")) for name in ("orchestrator", "workers", "cache"))
    return [root] if beside and not inside else []


__path__ = [*__path__, *_source_checkout_dirs()]  # noqa: PLE0237 - see _source_checkout_dirs

_EXPORTS = {
    "Orchestrator": "kiln.orchestrator.driver",
    "RunReport": "kiln.orchestrator.report",
    "CompilationConfig": "kiln.workers.config",
    "CompilationLevel": "kiln.workers.config",
    "CUDAGraphMode": "kiln.workers.config",
    "PassConfig": "kiln.workers.config",
    "KilnModel": "kiln.workers.runtime.kiln_model",
    "backend": "kiln.workers.compilation.backend",
    "compile": "kiln.workers.runtime.compiled_module",
    "CompiledModule": "kiln.workers.runtime.compiled_module",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from kiln.orchestrator.driver import Orchestrator
    from kiln.orchestrator.report import RunReport
    from kiln.workers.compilation.backend import backend
    from kiln.workers.runtime.compiled_module import CompiledModule, compile
    from kiln.workers.config import CompilationConfig, CompilationLevel, CUDAGraphMode, PassConfig
    from kiln.workers.runtime.kiln_model import KilnModel


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
