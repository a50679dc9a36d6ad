"""kiln's driver side: the Orchestrator API, placement and worker lifecycle, reports, the CLI.

Imports are lazy (PEP 562) so that `kiln cache …` and `kiln config …` start without importing
torch or ray. The public names live in `kiln` itself: `from kiln import Orchestrator`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Orchestrator": "kiln.orchestrator.driver",
    "RunReport": "kiln.orchestrator.report",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from kiln.orchestrator.driver import Orchestrator
    from kiln.orchestrator.report import RunReport


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kiln.orchestrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
