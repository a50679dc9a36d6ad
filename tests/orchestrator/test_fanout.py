"""Cluster fan-out end to end: simulated nodes (ray.cluster_utils.Cluster on 127.0.0.1), each with
its own cache root (`{node}`), real compiles of the one-layer example model.

The tests run in file order on one cluster: the first job's ranks stay up (they own the objects
they published) until test_producers_gone_consumers_compile_locally kills them.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.cache import maintenance
from kiln.orchestrator.cli_cache import cache_group
from kiln.orchestrator.registry import NAMESPACE, REGISTRY_NAME
from tests.orchestrator.conftest import TINY
from tests.orchestrator.test_fanout_registry import kill_and_wait, wait_until_lost
from tests.simulated_cluster import simulated_cluster

MODEL = "examples/toy_llama.py:build"
# TINY at sizes [2] has two unique graphs (its first and last piece, symbolic size only): what
# TP=1 compiles (tests/backend/test_cache_roundtrip.py), and what a cluster should compile once.
UNIQUE_GRAPHS = 2


@pytest.fixture(scope="module")
def cluster():
    with simulated_cluster([1, 1]) as c:
        yield c


def orchestrator(cluster, root, tp: int, placement: str = "PACK", config=None, **kwargs) -> Orchestrator:
    return Orchestrator(MODEL, tp, config or CompilationConfig(), str(root / "{node}"), address=cluster.address,
                        model_kwargs=TINY, placement=placement, progress=False, **kwargs)


def compiles(report) -> int:
    return sum(r["inductor_compiles"] for r in report.ranks)


def fetched(report) -> int:
    return sum(r["fanout"]["fetched"] for r in report.ranks)


def assert_roots_verify(report) -> None:
    for root in report.cache_root.split(", "):
        result = maintenance.verify(root)
        assert result.ok and result.blobs >= 1, (root, result)


@pytest.fixture(scope="module")
def first_job(cluster, tmp_path_factory):
    orch = orchestrator(cluster, tmp_path_factory.mktemp("first"), 2, "STRICT_SPREAD")  # fanout="auto"
    report = orch.warmup([2])
    yield orch, report
    orch.shutdown()


def test_tp2_over_two_nodes_compiles_as_often_as_tp1(first_job):
    _, report = first_job
    assert len({r["node_id"] for r in report.ranks}) == 2, "STRICT_SPREAD must put the ranks on two nodes"
    assert compiles(report) == UNIQUE_GRAPHS == report.to_dict()["fanout"]["unique_graphs"]
    assert fetched(report) == UNIQUE_GRAPHS  # each graph compiled on one node, fetched by the other
    for r in report.ranks:
        assert r["inductor_compiles"] + r["fanout"]["fetched"] == UNIQUE_GRAPHS
        assert r["fanout"]["fallbacks"] == [] and r["fanout"]["rejected"] == 0
    assert_roots_verify(report)
    assert f"fan-out:     {UNIQUE_GRAPHS} compiles across the cluster for {UNIQUE_GRAPHS} unique graphs" in report.table()


@pytest.fixture(scope="module")
def late_node(cluster, first_job):
    """A node with room for two ranks that joins after the first job; the first job's ranks
    hold the old nodes' CPUs, so two-rank jobs land here."""
    node = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield node
    if node in cluster.worker_nodes:
        cluster.remove_node(node)


def test_a_node_joining_later_fetches_everything_or_pulls_it(cluster, first_job, late_node, tmp_path):
    node_id = late_node.node_id[:12]
    with orchestrator(cluster, tmp_path / "late", 2) as orch:  # fanout="auto": the registry exists
        report = orch.warmup([2])
    assert {r["node_id"] for r in report.ranks} == {node_id}
    assert compiles(report) == 0 and fetched(report) == UNIQUE_GRAPHS  # the other rank loads what it stored
    assert all(r["fanout"]["sources"].keys() <= {n["node_id"] for n in first_job[1].ranks} for r in report.ranks)
    assert_roots_verify(report)

    # Ahead of time: `kiln cache pull` fills a cold root; a start from it compiles nothing.
    pulled = tmp_path / "pulled"
    result = CliRunner().invoke(cache_group, ["pull", "--address", cluster.address, "--root",
                                              str(pulled / node_id)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"pulled {UNIQUE_GRAPHS} graphs" in result.output and "0 failed" in result.output
    with orchestrator(cluster, pulled, 2, fanout="off") as orch:
        report = orch.warmup([2])
    assert {r["node_id"] for r in report.ranks} == {node_id}
    assert compiles(report) == 0 and all(r["fanout"] is None for r in report.ranks)
    assert_roots_verify(report)


def test_producers_gone_consumers_compile_locally(cluster, first_job, late_node, tmp_path):
    import ray
    from ray.util.placement_group import remove_placement_group

    orch, first = first_job
    registry = ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE)
    published = ray.get(registry.listing.remote())
    assert len(published) == UNIQUE_GRAPHS
    for worker in orch.workers:  # killed, not shut down: the registry still names their objects
        kill_and_wait(worker)
    for publication in published:
        wait_until_lost(publication["ref"][0])
    remove_placement_group(orch.pg)  # the old nodes' CPUs, for the tests after this one

    # STRICT_PACK: both ranks on the late node (the only one with room for two), one root.
    with orchestrator(cluster, tmp_path, 2, "STRICT_PACK") as consumer:
        report = consumer.warmup([2])
    cluster.remove_node(late_node)  # the next tests want two one-rank nodes
    reasons = [f["reason"] for r in report.ranks for f in r["fanout"]["fallbacks"]]
    assert len(reasons) == UNIQUE_GRAPHS and all("producer gone" in reason for reason in reasons), reasons
    assert all(r["fanout"]["rejected"] == 0 and r["fanout"]["fetched"] == 0 for r in report.ranks)
    assert compiles(report) == UNIQUE_GRAPHS  # locally, once: the node's other rank loads them
    assert any(w.startswith("fan-out: compiled locally: fetch from node") for r in report.ranks for w in r["warnings"])
    assert_roots_verify(first)
    assert_roots_verify(report)


def test_registry_killed_mid_job_completes_with_local_compiles(cluster, tmp_path):
    import ray

    with orchestrator(cluster, tmp_path, 1, fanout="on", config=CompilationConfig(cudagraph_capture_sizes=[2])) as orch:
        orch.start()  # the rank holds the registry's handle now
        kill_and_wait(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE))
        report = orch.warmup()
    (rank,) = report.ranks
    assert rank["inductor_compiles"] == UNIQUE_GRAPHS
    assert rank["fanout"]["registry"].startswith("registry unavailable")
    assert [f["reason"] for f in rank["fanout"]["fallbacks"]] == [rank["fanout"]["registry"]] * UNIQUE_GRAPHS
    assert_roots_verify(report)


def test_two_concurrent_jobs_on_two_nodes_compile_each_graph_once(cluster, tmp_path):
    jobs = [orchestrator(cluster, tmp_path, 1, fanout="on") for _ in range(2)]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(lambda orch: orch.warmup([2]), jobs))
    finally:
        for orch in jobs:
            orch.shutdown()
    assert len({r["node_id"] for report in reports for r in report.ranks}) == 2
    assert sum(compiles(report) for report in reports) == UNIQUE_GRAPHS
    assert sum(fetched(report) for report in reports) == UNIQUE_GRAPHS
    for report in reports:
        assert_roots_verify(report)
