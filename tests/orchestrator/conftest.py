"""Shared by the orchestrator tests (the module-scoped `ray_cluster` fixture is in tests/conftest.py)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# A one-layer example model keeps CPU compiles short: 3 pieces, 2 of them compiled.
TINY = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 2, "vocab": 64, "max_seq_len": 16, "max_seqs": 4}
