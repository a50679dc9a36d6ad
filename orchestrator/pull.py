"""`kiln cache pull --address ADDR`: fill this node's cache from what the cluster has published.

For a node about to serve (a new replica, a new node): every graph the cluster's artifact
registry lists is fetched through Ray's object store, verified like a rank's fetch (same cache
key and graph, size and digest; workers/fanout.py) and stored in the local root, so that the
node's first start compiles nothing. The objects live as long as the workers that published
them: pull from a cluster whose warm-up or serving processes are still running.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from kiln.cache import CacheStore
from kiln.cache.errors import CacheError


@dataclasses.dataclass
class PullReport:
    """What pull stored, skipped and could not get."""

    root: str
    stored: int = 0
    present: int = 0
    bytes: int = 0
    seconds: float = 0.0
    sources: dict[str, int] = dataclasses.field(default_factory=dict)
    keys: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # "<key>/<graph>: why"


def pull(address: str | None, root: str | os.PathLike | None, keys: list[str] | None = None) -> PullReport:
    """Pull every published graph (of the cache keys starting with one of `keys`, if given)
    into `root`. Raises CacheError when the cluster has no registry."""
    import ray

    from kiln.orchestrator.cluster import connect
    from kiln.orchestrator.registry import REGISTRY_NAME, registry_actor
    from kiln.workers.fanout import FanoutClient

    connect(address)
    registry, _ = registry_actor(create=False)
    if registry is None:
        raise CacheError(f"the Ray cluster has no {REGISTRY_NAME} actor: nothing is published. Run the "
                         "warm-up with fan-out on (`kiln warmup --fanout on --fanout-lifetime cluster`)")
    listing: list[dict[str, Any]] = ray.get(registry.listing.remote(), timeout=60)
    if keys:
        listing = [p for p in listing if any(p["cache_key"].startswith(k) for k in keys)]
    store = CacheStore(root)
    if store.read_only:
        raise CacheError(f"cache root {store.root} is not writable; cannot pull into it")
    report = PullReport(str(store.root))
    client = FanoutClient(registry)
    t0 = time.perf_counter()
    for cache_key in sorted({p["cache_key"] for p in listing}):
        factors = ray.get(registry.factors.remote(cache_key), timeout=60)
        graphs = [p for p in listing if p["cache_key"] == cache_key]
        if factors is None:
            report.failed += [f"{cache_key}/{p['graph_key']}: the registry has no key factors for it" for p in graphs]
            continue
        entry = store.entry(factors)
        if entry.key != cache_key:
            report.failed += [f"{cache_key}/{p['graph_key']}: its key factors hash to {entry.key}" for p in graphs]
            continue
        report.keys.append(cache_key)
        for publication in graphs:
            graph_key = publication["graph_key"]
            if entry.lookup(graph_key) is not None:
                report.present += 1
                continue
            fetched = client.fetch(cache_key, graph_key, publication)
            if fetched is None:
                report.failed.append(f"{cache_key}/{graph_key}: {client.fallbacks[-1]['reason']}")
                continue
            entry.get_or_compute(graph_key, lambda data=fetched.data: data)
            report.stored += 1
            report.bytes += len(fetched.data)
            report.sources[fetched.node] = report.sources.get(fetched.node, 0) + 1
    report.seconds = time.perf_counter() - t0
    return report
