"""A real compile, exported as a bundle and imported into an empty root: the warm start from it
compiles nothing (children with empty Inductor/Triton caches: measured, not assumed)."""

from __future__ import annotations

from click.testing import CliRunner

from kiln.orchestrator.cli_cache import cache_group
from tests.backend.conftest import run_child

SPEC = {"model": {"layers": 1}, "sizes": [2], "check_sizes": [2, 3]}


def cli(*args):
    result = CliRunner().invoke(cache_group, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_warm_start_from_an_imported_bundle_compiles_nothing(tmp_path):
    cold_root, warm_root, bundle = tmp_path / "cold", tmp_path / "imported", tmp_path / "bundle.tar"
    cold = run_child({**SPEC, "root": str(cold_root)}, tmp_path)
    assert cold["record"]["inductor_compiles"] > 0

    cli("export", "--root", cold_root, "-o", bundle)
    assert f"added {cold['record']['cache_key']}" in cli("import", bundle, "--root", warm_root)
    assert "0 quarantined, 0 problems" in cli("verify", "--root", warm_root)

    warm = run_child({**SPEC, "root": str(warm_root)}, tmp_path)
    rec = warm["record"]
    assert rec["cache_key"] == cold["record"]["cache_key"]
    assert rec["inductor_compiles"] == 0 and rec["cache_misses"] == 0
    assert rec["artifacts_loaded"] == cold["record"]["artifacts_saved"]
    assert warm["builds"] == [], "a warm start from the bundle ran the C++ compiler"
    assert warm["outputs"] == cold["outputs"]
