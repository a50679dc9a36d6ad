"""The cluster-scope artifact registry: which graphs are published or being compiled, where.

One named Ray actor per cluster (`kiln-artifact-registry` in namespace `kiln`) that holds
metadata only: for each (cache key, graph key), either a claim (the rank compiling it, on which
node, since when) or a publication (digest, size, source node, and the Ray object reference
whose bytes a rank put into the object store). The bytes themselves stay with the rank that
put them: it owns the object, so the object lives as long as that worker process does. When a
worker dies its objects are lost, consumers' fetches fail, and they compile locally.

A claim is dropped when its claimant died: the registry probes the claimant's actor with one
queued no-op call (`__ray_ready__`) and sees it fail once the actor is gone. Consumers also
give up waiting after their own timeout. The worker side (workers/fanout.py) talks to this
actor through its handle, which the driver passes in the set-up payload; workers never import
this module.

Lifetime: "job" (default) ties the actor to the driver that created it; "cluster" makes it
detached, so it outlives the warm-up for serving replicas that join later.
"""

from __future__ import annotations

import logging
import time
from typing import Any

REGISTRY_NAME = "kiln-artifact-registry"
NAMESPACE = "kiln"
LIFETIMES = ("job", "cluster")

log = logging.getLogger("kiln.registry")


class ArtifactRegistry:
    """Metadata about compiled graphs across a cluster. Plain class; see registry_actor()."""

    def __init__(self) -> None:
        self._claims: dict[tuple[str, str], dict[str, Any]] = {}
        self._published: dict[tuple[str, str], dict[str, Any]] = {}
        self._factors: dict[str, dict] = {}  # cache key -> its key factors (what `kiln cache pull` writes)
        self.counters = {"claims": 0, "publications": 0, "forgotten": 0, "dead_claims": 0}

    def ask(self, cache_key: str, graph_key: str, node: str, who: str, claimant: Any = None) -> dict[str, Any]:
        """What a rank that missed in its node's cache should do about one graph:
        {"action": "fetch", "ref": [ObjectRef], "digest", "size", "node", ...}: another node has it;
        {"action": "wait", "node", "since"}: another node is compiling it;
        {"action": "compile"}: nobody has it, and the caller now holds the claim (publish or release it).
        `who` names the asking rank (its actor id); `claimant` is its actor handle, probed for liveness."""
        key = (cache_key, graph_key)
        published = self._published.get(key)
        if published is not None:
            return {"action": "fetch", **{k: v for k, v in published.items() if k != "producer"}}
        claim = self._claims.get(key)
        if claim is not None and claim["who"] != who and not self._claimant_dead(claim):
            return {"action": "wait", "node": claim["node"], "since": claim["since"]}
        self._claims[key] = {"node": node, "who": who, "claimant": claimant, "since": time.time(), "probe": None}
        self.counters["claims"] += 1
        return {"action": "compile"}

    def publish(self, cache_key: str, graph_key: str, digest: str, size: int, node: str, producer: str,
                ref_box: list, factors: dict | None = None) -> bool:
        """Record that `producer` (an actor id) on `node` holds graph_key's bytes as ref_box[0].
        The ref comes in a list so that Ray hands over the reference, not the bytes. False (and
        nothing changes) if the graph is already published: the caller may drop its object."""
        key = (cache_key, graph_key)
        self._claims.pop(key, None)
        if factors is not None:
            self._factors.setdefault(cache_key, factors)
        if key in self._published:
            return False
        assert len(ref_box) == 1, ref_box
        self._published[key] = {"cache_key": cache_key, "graph_key": graph_key, "digest": digest, "size": size,
                                "node": node, "producer": producer, "ref": ref_box, "at": time.time()}
        self.counters["publications"] += 1
        return True

    def wants(self, cache_key: str, graph_key: str) -> bool:
        """Whether the cluster lacks a publication of this graph (a local hit may offer its copy)."""
        return (cache_key, graph_key) not in self._published

    def release(self, cache_key: str, graph_key: str, who: str) -> None:
        """Drop `who`'s claim on a graph it failed to compile, so that others stop waiting."""
        claim = self._claims.get((cache_key, graph_key))
        if claim is not None and claim["who"] == who:
            del self._claims[(cache_key, graph_key)]

    def forget(self, cache_key: str, graph_key: str, digest: str, reason: str) -> bool:
        """Drop a publication a consumer could not use (object lost, bytes that do not match)."""
        key = (cache_key, graph_key)
        published = self._published.get(key)
        if published is None or published["digest"] != digest:
            return False
        del self._published[key]
        self.counters["forgotten"] += 1
        log.warning("forgetting graph %s of cache key %s from node %s: %s", graph_key, cache_key,
                    published["node"], reason)
        return True

    def forget_producers(self, producers: list[str]) -> int:
        """Drop every publication and claim of the given actors (workers being shut down)."""
        gone = set(producers)
        stale = [k for k, v in self._published.items() if v["producer"] in gone]
        for key in stale:
            del self._published[key]
        for key in [k for k, v in self._claims.items() if v["who"] in gone]:
            del self._claims[key]
        self.counters["forgotten"] += len(stale)
        return len(stale)

    def listing(self, cache_key: str | None = None) -> list[dict[str, Any]]:
        """Every publication (of one cache key, if given), refs included, for `kiln cache pull`."""
        return [{k: v for k, v in p.items() if k != "producer"}
                for (ck, _), p in sorted(self._published.items()) if cache_key is None or ck == cache_key]

    def factors(self, cache_key: str) -> dict | None:
        return self._factors.get(cache_key)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "published": len(self._published), "claimed": len(self._claims),
                "cache_keys": sorted({ck for ck, _ in self._published})}

    def _claimant_dead(self, claim: dict[str, Any]) -> bool:
        """Whether the claim's actor is gone: one probe call per claim, checked without waiting.
        A live actor busy compiling leaves the probe pending; a dead one fails it."""
        import ray

        claimant = claim["claimant"]
        if claimant is None:
            return False
        if claim["probe"] is None:
            claim["probe"] = claimant.__ray_ready__.remote()
        ready, _ = ray.wait([claim["probe"]], timeout=0)
        if not ready:
            return False
        try:
            ray.get(claim["probe"])
        except ray.exceptions.RayActorError:
            self.counters["dead_claims"] += 1
            return True
        claim["probe"] = None  # alive, between two tasks: probe again next time
        return False


def registry_actor(lifetime: str = "job", *, create: bool = True) -> tuple[Any, bool]:
    """(handle, created_here) of the cluster's registry; with create=False, (None, False) when
    there is none. lifetime "cluster" makes a new registry detached (it outlives this driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if lifetime not in LIFETIMES:
        raise ValueError(f"registry lifetime must be one of {', '.join(LIFETIMES)}, got {lifetime!r}")
    try:
        return ray.get_actor(REGISTRY_NAME, namespace=NAMESPACE), False
    except ValueError:
        if not create:
            return None, False
    # On the driver's node (soft): a registry on a node that goes away takes fan-out with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    options: dict[str, Any] = {"name": REGISTRY_NAME, "namespace": NAMESPACE, "num_cpus": 0,
                               "get_if_exists": True, "scheduling_strategy": here, "max_restarts": 0}
    if lifetime == "cluster":
        options["lifetime"] = "detached"
    return ray.remote(ArtifactRegistry).options(**options).remote(), True
