"""Cache-key factors: every kiln module is classified; no absolute paths or ranks in keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.workers.compilation import factors as cf


def test_codegen_source_covers_whole_packages():
    """Every file of the codegen sub-packages is hashed (a new file cannot be forgotten), and no
    runtime module is."""
    workers = Path(cf.__file__).resolve().parents[1]
    hashed = {p.relative_to(workers).as_posix() for p in cf.codegen_source_files()}
    for package in cf.CODEGEN_PACKAGES:
        on_disk = {p.relative_to(workers).as_posix() for p in (workers / package).rglob("*.py")}
        assert on_disk and on_disk <= hashed, sorted(on_disk - hashed)
    assert "torch_internals.py" in hashed
    assert not any(name.startswith(("runtime/", "models/")) or name == "worker.py" for name in hashed)


def test_factors_hold_no_machine_paths():
    """The whole key (tests/cache_key/ proves that each factor invalidates)."""
    import json
    import os

    from kiln.workers import torch_internals

    # Path-valued Inductor options, set to absolute paths, stay out.
    options = {"global_cache_dir": "/abs/cache", "aot_inductor.output_path": "/abs/out"}
    with torch_internals.inductor_config().patch(options):
        factors, _ = cf.cache_key_factors("h", [], torch.device("cpu"))
    text = json.dumps(factors)
    assert "/" not in text and os.path.expanduser("~") not in text  # no paths of any kind
    assert "global_cache_dir" not in factors["inductor"]["config"]


def test_unkeyable_inductor_value_is_a_clear_error():
    with pytest.raises(ValueError, match="Inductor option 'x' holds <object object at 0x"):
        cf._json_value("x", object())
    assert cf._json_value("s", {3, 1}) == [1, 3] and cf._json_value("t", ("a", None)) == ["a", None]


def test_code_hash_uses_relative_paths_and_contents(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    digest, files = cf.code_hash([str(pkg / "model.py")])
    assert files == ["pkg/model.py"]
    (pkg / "model.py").write_text("A = 2\n")
    assert cf.code_hash([str(pkg / "model.py")])[0] != digest
