"""Fixtures shared by the CompilationConfig tests."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def pass_modules(tmp_path, monkeypatch):
    """Write small modules to tmp_path (importable); unique names, removed afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"kiln_test_pass_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.fixture
def subprocess_env():
    """env(**extra) -> environment for a subprocess that imports kiln from this checkout."""

    def env(**extra: str) -> dict[str, str]:
        result = dict(os.environ)
        paths = [str(REPO_ROOT), result.get("PYTHONPATH", "")]
        result["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        result.update(extra)
        return result

    return env
