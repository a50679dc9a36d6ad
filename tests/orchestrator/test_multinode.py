"""Two simulated nodes (ray.cluster_utils.Cluster), each with its own cache root."""

from __future__ import annotations

import pytest

from kiln import CompilationConfig, Orchestrator
from tests.orchestrator.conftest import TINY
from tests.simulated_cluster import simulated_cluster


@pytest.fixture(scope="module")
def two_nodes():
    with simulated_cluster([1, 1]) as cluster:
        yield cluster


def test_ranks_on_both_nodes_fill_both_caches(two_nodes, tmp_path):
    root = tmp_path / "{node}"
    orch = Orchestrator("examples/toy_llama.py:build", 2, CompilationConfig(), str(root), address=two_nodes.address,
                        model_kwargs=TINY, placement="STRICT_SPREAD", progress=False, fanout="off")
    with orch:
        report = orch.warmup([2])
    node_ids = {r["node_id"] for r in report.ranks}
    assert len(node_ids) == 2, "STRICT_SPREAD must put the ranks on different nodes"
    for node_id in node_ids:
        entry = tmp_path / node_id / report.cache_key
        assert (entry / "key_factors.json").is_file()
        assert len(list((entry / "blobs").iterdir())) == 2
    # Separate roots and no fan-out (tests/orchestrator/test_fanout.py): each node compiles for itself.
    assert [r["inductor_compiles"] for r in report.ranks] == [2, 2]
