"""torch's private APIs are reached through one module, every symbol it relies on exists, and
torch releases kiln is not tested on are refused clearly."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from kiln.workers import torch_internals

REPO_ROOT = Path(__file__).resolve().parents[2]
PRIVATE = re.compile(r"torch\._[a-z]|torch\.utils\._|from torch\._|import torch\._")


@pytest.mark.parametrize("module, name", torch_internals.PRIVATE_SYMBOLS)
def test_every_private_symbol_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} is gone from this torch"


def test_no_private_torch_use_outside_the_seam():
    offenders = []
    for folder in ("orchestrator", "workers", "cache", "kiln", "examples"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            if path.name == "torch_internals.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE.search(code) and not code.lstrip().startswith(('"', "'")):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "use kiln.workers.torch_internals instead:\n" + "\n".join(offenders)


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.12.1", "2.13.0+cpu"])
def test_tested_releases_are_accepted(version):
    torch_internals.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.14.0", "3.0.0"])
def test_other_releases_are_refused_clearly(version, monkeypatch):
    monkeypatch.delenv("KILN_ALLOW_UNTESTED_TORCH", raising=False)
    with pytest.raises(ImportError, match=rf"tested on torch 2\.11 to 2\.13, but torch {re.escape(version)}"):
        torch_internals.check_torch_version(version)
    monkeypatch.setenv("KILN_ALLOW_UNTESTED_TORCH", "1")
    with pytest.warns(RuntimeWarning, match="trying anyway"):
        torch_internals.check_torch_version(version)


def test_pyproject_declares_the_tested_range():
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    (lo_major, lo_minor), (hi_major, hi_minor) = torch_internals.TESTED_TORCH
    assert torch_dep == f"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"
