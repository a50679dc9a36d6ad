"""TP=4 and TP=8 with CPU ranks on a simulated two-node cluster (the 8-GPU run's properties,
checked where no 8-GPU machine is lent). Slow: run with -m slow."""

from __future__ import annotations

import pytest

from kiln import CompilationConfig, Orchestrator
from tests.orchestrator.conftest import TINY
from tests.simulated_cluster import simulated_cluster

# Eight ranks and three warm-ups on 2 cores: more than the suite's default per-test timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def two_nodes_eight_cpus():
    with simulated_cluster([4, 4]) as cluster:
        yield cluster


@pytest.mark.parametrize("tp", [4, 8])
def test_compile_once_at_tp(tp, two_nodes_eight_cpus, tmp_path):
    model = {**TINY, "heads": 8, "kv_heads": 8, "hidden": 64}
    config = CompilationConfig()
    root = str(tmp_path / "root")  # one filesystem: both simulated nodes share the root
    with Orchestrator("examples/toy_llama.py:build", 1, config, root, model_kwargs=model, progress=False) as orch:
        tp1 = orch.warmup([2]).totals()["inductor_compiles"]
    with Orchestrator("examples/toy_llama.py:build", tp, config, str(tmp_path / f"root{tp}"),
                      address=two_nodes_eight_cpus.address, model_kwargs=model, progress=False,
                      placement="SPREAD") as orch:
        report = orch.warmup([2])
        cold = report.totals()
    assert len(report.ranks) == tp and len({r["node_id"] for r in report.ranks}) == 2
    assert all(r["device"] == "cpu" and r["dist_backend"] == "gloo" for r in report.ranks)
    assert tp1 > 0 and cold["inductor_compiles"] == tp1, "compile once: as many compiles as at TP=1"
    with Orchestrator("examples/toy_llama.py:build", tp, config, str(tmp_path / f"root{tp}"),
                      address=two_nodes_eight_cpus.address, model_kwargs=model, progress=False) as orch:
        assert orch.warmup([2]).totals()["inductor_compiles"] == 0
