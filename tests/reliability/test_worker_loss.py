"""Worker loss: a node of a two-node Ray cluster disappears while a TP=2 warm-up compiles.

The node goes once a first piece is published. The driver raises WarmupError naming the rank(s)
that were on the lost node; once a node is added back, a retry compiles exactly the pieces the
cache does not hold (counted on disk, against the model's structure) and loads the rest, and
the cache verifies clean.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kiln.workers.compilation.cached_trace import GRAPH_KEY

from tests.orchestrator.conftest import TINY
from tests.reliability.support import MODEL, UNIQUE_PIECES, verify_clean
from tests.simulated_cluster import simulated_cluster

# About 45 s on 2 cores (two-node cluster, two warm-ups): under the 60 s bar for -m slow.
pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def two_nodes():
    """A head and one worker node, one CPU each: a TP=2 STRICT_SPREAD job needs both."""
    with simulated_cluster([1, 1]) as cluster:
        yield cluster


def published(root) -> set[str]:
    """The graph keys with a published artifact (a ref) in any entry under `root` (the cached
    Dynamo trace, a record of its own, is no compiled graph)."""
    return {ref.stem for ref in root.glob("*/refs/*.json")} - {GRAPH_KEY}


def gone(pid: int) -> bool:
    """The process has exited (or is a zombie nobody reaped: it runs nothing either)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def orchestrator(root, address: str):
    from kiln import CompilationConfig, Orchestrator

    return Orchestrator(MODEL, 2, CompilationConfig(), str(root), address=address, model_kwargs=TINY,
                        placement="STRICT_SPREAD", progress=False)


@pytest.mark.timeout(1500)  # its own waits (a compile to start, the driver to give up) come first
def test_lost_node_names_its_ranks_and_a_retry_compiles_only_what_is_missing(two_nodes, tmp_path, figure):
    from kiln.orchestrator.driver import WarmupError

    figure.scenario = "worker loss: node removed mid compile (TP=2)"
    root = tmp_path / "root"
    (victim,) = [node for node in two_nodes.list_all_nodes() if node is not two_nodes.head_node]
    outcome: dict = {}

    def run() -> None:
        orch = outcome["orch"] = orchestrator(root, two_nodes.address)
        try:
            with orch:
                outcome["report"] = orch.warmup([2])
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not published(root):  # some pieces are in the cache, others not yet
        assert thread.is_alive() and time.monotonic() < deadline, f"nothing was published: {outcome}"
        time.sleep(0.05)
    two_nodes.remove_node(victim)
    figure.fault()
    thread.join(600)
    assert not thread.is_alive(), "the driver hung after losing a node"

    error = outcome.get("error")
    assert isinstance(error, WarmupError), outcome
    lost = {n.rank for n in outcome["orch"].nodes if victim.node_id.startswith(n.node_id)}
    assert lost, "no rank was placed on the removed node"
    named = {f["rank"] for f in error.failures}
    assert lost <= named, f"lost ranks {lost}, error names {error.failures}"
    assert all("died" in f["cause"] or "lost" in f["cause"] for f in error.failures if f["rank"] in lost)

    # What the failed run left: counted once none of its workers can publish any more.
    pids = [n.pid for n in outcome["orch"].nodes]
    deadline = time.monotonic() + 120
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"workers {pids} of the failed run still run"
        time.sleep(0.1)
    held = published(root)
    (key,) = [entry.name for entry in root.iterdir() if (entry / "key_factors.json").exists()
              and json.loads((entry / "key_factors.json").read_text()).get("kind") != "dynamo_trace"]
    assert 1 <= len(held) <= UNIQUE_PIECES, held
    # The tiny model at TP=2 and size 2: UNIQUE_PIECES graphs (symbolic size only), fetched by
    # both ranks; the retry compiles each graph the cache lacks once and loads everything else.
    missing = UNIQUE_PIECES - len(held)

    two_nodes.add_node(num_cpus=1)
    two_nodes.wait_for_nodes()
    with orchestrator(root, two_nodes.address) as orch:
        report = orch.warmup([2])
    totals = report.totals()
    assert len(report.ranks) == 2 and report.cache_key == key
    assert totals["inductor_compiles"] == missing, (totals, held)
    assert totals["cache_hits"] == 2 * UNIQUE_PIECES - missing, (totals, held)
    assert published(root) >= held and len(published(root)) == UNIQUE_PIECES
    verify_clean(root)
    figure.recovered()
