"""The artifact registry and the rank-side client on a real (local) Ray cluster, without compiling:
claims and waits, fetches that verify, and every failure turning into a local compile."""

from __future__ import annotations

import time

import pytest

from kiln.cache.digest import digest_bytes
from kiln.orchestrator.fanout import fanout_lines, fanout_summary
from kiln.orchestrator.registry import ArtifactRegistry
from kiln.workers.fanout import FanoutClient, FanoutSettings

CACHE_KEY, GRAPH = "c" * 32, "g1"
DATA = b"compiled artifact " * 20000  # 360 kB, about the size of a small real artifact


@pytest.fixture
def registry(ray_cluster):
    import ray

    handle = ray.remote(ArtifactRegistry).options(num_cpus=0).remote()  # unnamed: private to the test
    yield handle
    ray.kill(handle)


def client(registry, **settings) -> FanoutClient:
    return FanoutClient(registry, FanoutSettings(**{"call_s": 30, "poll_s": 0.05, **settings}))


class Producer:
    """A worker stand-in: a Ray actor whose client claims, puts and publishes (and so owns the object)."""

    def __init__(self, registry):
        self.client = FanoutClient(registry)

    def claim(self, cache_key, graph_key):
        return self.client.obtain(cache_key, graph_key) is None and not self.client.fallbacks

    def publish(self, cache_key, graph_key, data):
        return self.client.publish(cache_key, graph_key, data, {"factors": 1})


def kill_and_wait(actor) -> None:
    """ray.kill returns at once; wait until the actor is really gone (its objects with it)."""
    import ray

    ray.kill(actor)
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(600):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
            time.sleep(0.1)


def wait_until_lost(ref) -> None:
    """An owner's death reaches the object store a little after the actor is gone: until then
    the bytes (verified, so harmless) may still be read. Wait for the loss itself."""
    import ray

    for _ in range(300):
        try:
            ray.get(ref, timeout=30)
        except ray.exceptions.ObjectLostError:
            return
        time.sleep(0.1)
    raise AssertionError("the object outlived its owner")


@pytest.fixture
def producer(registry):
    import ray

    actor = ray.remote(Producer).options(num_cpus=0).remote(registry)
    yield actor
    ray.kill(actor)


def test_claim_wait_publish_fetch(registry):
    import ray

    first, second = client(registry), client(registry, wait_s=0.3)
    assert first.obtain(CACHE_KEY, GRAPH) is None and not first.fallbacks  # nobody has it: first compiles
    assert second.obtain(CACHE_KEY, GRAPH) is None  # first is compiling: second waits, then gives up
    assert second.fallbacks[0]["reason"].startswith("waited 0.3 s for node") and second.wait_seconds > 0
    assert first.publish(CACHE_KEY, GRAPH, DATA, {"f": 1})
    fetched = client(registry).obtain(CACHE_KEY, GRAPH)
    assert fetched is not None and fetched.data == DATA and fetched.node == first.node
    assert not client(registry).publish(CACHE_KEY, GRAPH, DATA, {"f": 1})  # published once
    assert ray.get(registry.factors.remote(CACHE_KEY)) == {"f": 1}
    assert ray.get(registry.stats.remote())["published"] == 1


def test_altered_bytes_are_rejected_and_forgotten(registry):
    import ray

    altered = bytearray(DATA)
    altered[100] ^= 0xFF
    ref = ray.put(bytes(altered))
    assert ray.get(registry.publish.remote(CACHE_KEY, GRAPH, digest_bytes(DATA), len(DATA), "elsewhere", "x", [ref]))
    consumer = client(registry)
    assert consumer.obtain(CACHE_KEY, GRAPH) is None
    assert consumer.rejected == 1 and "does not match its digest" in consumer.fallbacks[0]["reason"]
    assert ray.get(registry.listing.remote()) == [], "a rejected publication must be forgotten"


def test_an_artifact_of_another_cache_key_is_rejected(registry):
    import ray

    ref = ray.put(DATA)
    ray.get(registry.publish.remote(CACHE_KEY, GRAPH, digest_bytes(DATA), len(DATA), "elsewhere", "x", [ref]))
    publication = ray.get(registry.listing.remote())[0]
    consumer = client(registry)
    assert consumer.fetch("d" * 32, GRAPH, publication) is None
    assert consumer.rejected == 1 and "another cache key" in consumer.fallbacks[0]["reason"]


def test_producer_gone_means_a_local_compile(registry, producer):
    import ray

    assert ray.get(producer.publish.remote(CACHE_KEY, GRAPH, DATA))
    kill_and_wait(producer)  # its object dies with it
    wait_until_lost(ray.get(registry.listing.remote())[0]["ref"][0])
    consumer = client(registry)
    assert consumer.obtain(CACHE_KEY, GRAPH) is None
    assert "producer gone" in consumer.fallbacks[0]["reason"] and consumer.rejected == 0
    assert ray.get(registry.listing.remote()) == []


def test_a_dead_claimant_frees_its_claim(registry, producer):
    import ray

    assert ray.get(producer.claim.remote(CACHE_KEY, GRAPH))
    kill_and_wait(producer)
    consumer = client(registry, wait_s=120)
    t0 = time.monotonic()
    assert consumer.obtain(CACHE_KEY, GRAPH) is None
    assert not consumer.fallbacks, "the consumer should take over the claim, not time out"
    assert time.monotonic() - t0 < 120
    assert ray.get(registry.stats.remote())["dead_claims"] == 1


def test_registry_killed_means_local_compiles(registry):
    import ray

    consumer = client(registry)
    ray.kill(registry)
    assert consumer.obtain(CACHE_KEY, GRAPH) is None
    assert consumer.obtain(CACHE_KEY, "g2") is None
    assert [f["reason"] for f in consumer.fallbacks] == ["registry unavailable (ActorDiedError)"] * 2
    assert consumer.publish(CACHE_KEY, GRAPH, DATA, {}) is False
    assert consumer.report()["registry"] == "registry unavailable (ActorDiedError)"


def test_report_summary_and_lines():
    fetched = {"fetched": 2, "bytes_fetched": 3 << 20, "fetch_seconds": 0.5, "sources": {"node-a": 2},
               "fetches": [], "wait_seconds": 1.0, "published": 0, "rejected": 1,
               "fallbacks": [{"graph_key": "g", "reason": "producer gone"}], "registry": "ok"}
    compiled = {**fetched, "fetched": 0, "bytes_fetched": 0, "sources": {}, "published": 2, "rejected": 0,
                "fallbacks": []}
    phases = [{"name": "compile piece 0 size sym", "extra": {"graph_key": "a"}},
              {"name": "fetch piece 0 size sym", "extra": {"graph_key": "a"}},
              {"name": "load piece 2 size sym", "extra": {"graph_key": "b"}}]
    ranks = [{"rank": 0, "inductor_compiles": 2, "fanout": compiled, "phases": phases},
             {"rank": 1, "inductor_compiles": 1, "artifacts_loaded": 0, "fanout": fetched, "phases": phases}]
    summary = fanout_summary(ranks)
    assert summary["compiles"] == 3 and summary["unique_graphs"] == 2
    assert summary["fetched"] == 2 and summary["rejected"] == 1 and summary["fallbacks"] == 1
    lines = fanout_lines(ranks)
    assert lines[0].startswith("fan-out:     3 compiles across the cluster for 2 unique graphs")
    assert "fetched 2 (3.00 MiB in 0.50 s; 2 from node-a)" in lines[2] and "producer gone" in lines[2]
    assert fanout_summary([{"rank": 0, "fanout": None}]) is None and fanout_lines([]) == []


def test_lifetime_and_auto(ray_cluster):
    import ray

    from kiln import Orchestrator
    from kiln.orchestrator.fanout import start_fanout
    from kiln.orchestrator.registry import NAMESPACE, REGISTRY_NAME

    one_node = ["a", "a"]  # the node of each rank
    assert start_fanout("auto", "job", one_node, 600) is None, "a one-node job starts no registry"
    assert start_fanout("off", "job", ["a", "b"], 600) is None

    kept = start_fanout("on", "cluster", one_node, 600)
    assert kept.created_here and kept.payload()["wait_s"] == 600
    joined = start_fanout("auto", "job", one_node, 600)  # a registry runs: auto joins it
    assert joined is not None and not joined.created_here
    joined.teardown([])
    kept.teardown([])  # a cluster-lifetime registry outlives its job
    assert ray.get(ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE).stats.remote())["published"] == 0
    kill_and_wait(kept.registry)

    job = start_fanout("on", "job", one_node, 600)
    job.teardown([])  # a job-lifetime registry goes with the job that started it
    with pytest.raises(ray.exceptions.RayActorError):  # ray.kill returns at once: poll for the death
        for _ in range(600):
            ray.get(job.registry.stats.remote(), timeout=30)
            time.sleep(0.1)

    for bad in ({"fanout": "yes"}, {"fanout_lifetime": "forever"}, {"fanout_wait_s": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Orchestrator("examples/toy_llama.py:build", 1, **bad)
