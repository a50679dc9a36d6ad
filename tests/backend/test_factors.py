"""Cache-key factors: every kiln module is classified; no absolute paths or ranks in keys."""

from __future__ import annotations

from pathlib import Path

import torch

from workers import compiler_factors as cf


def test_every_workers_module_is_classified():
    modules = {p.stem for p in Path(cf.__file__).parent.glob("*.py")}
    classified = set(cf.CODEGEN_MODULES) | set(cf.RUNTIME_MODULES)
    assert modules == classified, f"classify in compiler_factors: {sorted(modules ^ classified)}"
    assert not set(cf.CODEGEN_MODULES) & set(cf.RUNTIME_MODULES)


def test_factors_hold_no_machine_paths():
    import json
    import os

    factors = cf.compiler_factors(torch.device("cpu"))
    text = json.dumps(factors)
    assert "/" not in text and os.path.expanduser("~") not in text  # no paths of any kind
    for key in ("torch", "inductor_source", "python", "kiln", "kiln_source", "cache_schema", "device"):
        assert key in factors
    assert set(factors["device"]) >= {"cpu_capability", "threads"}


def test_code_hash_uses_relative_paths_and_contents(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    digest, files = cf.code_hash([str(pkg / "model.py")])
    assert files == ["pkg/model.py"]
    (pkg / "model.py").write_text("A = 2\n")
    assert cf.code_hash([str(pkg / "model.py")])[0] != digest
