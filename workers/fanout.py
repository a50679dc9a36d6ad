"""Cluster fan-out, rank side: a graph missing from the node's cache is asked of the cluster first.

Under the node-local compile-once lock, a rank that misses asks the cluster's artifact registry
(a named Ray actor the driver made; its handle comes in the set-up payload) what to do:

- another node published it: fetch the bytes through Ray's object store, check their digest and
  that they were built under this rank's own cache key, and store them in the node's cache;
- another node is compiling it: wait for that (bounded by `wait_s`), then fetch;
- nobody has it: compile, then put the bytes into the object store (this worker owns the
  object, so it lives as long as this process) and publish the reference.

Anything that goes wrong (the registry killed or unreachable, the producer dead and its object
lost, a transfer too slow, bytes whose digest does not match) is a local compile, never a wrong
load: the reason goes into the record's warnings and into report(). Imports no torch, and Ray
only when a client is made: the worker passes the registry's handle, never this module's caller.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable

from kiln.cache.digest import digest_bytes


@dataclasses.dataclass
class FanoutSettings:
    """How a rank talks to the registry (the driver sends these with the registry's handle)."""

    wait_s: float = 600.0
    """Longest wait for another node's compile of one graph before compiling it here."""
    fetch_s: float = 300.0
    """Longest transfer of one artifact through the object store."""
    call_s: float = 30.0
    """Longest answer to one registry call; past it the registry counts as unavailable."""
    poll_s: float = 0.2
    """Pause between two questions while another node compiles."""


@dataclasses.dataclass
class Fetched:
    data: bytes
    node: str
    seconds: float


def make_client(payload: dict[str, Any] | None) -> FanoutClient | None:
    """The client for the set-up payload's "fanout" part ({"registry": handle, **settings}), or
    None when the driver turned fan-out off."""
    if not payload or payload.get("registry") is None:
        return None
    settings = FanoutSettings(**{k: v for k, v in payload.items() if k != "registry"})
    return FanoutClient(payload["registry"], settings)


class FanoutClient:
    """One rank's conversation with the registry, and what came of it (report())."""

    def __init__(self, registry: Any, settings: FanoutSettings | None = None):
        import ray

        ctx = ray.get_runtime_context()
        self.registry = registry
        self.settings = settings or FanoutSettings()
        self.node = ctx.get_node_id()[:12]  # the `{node}` of cache roots
        actor_id = ctx.get_actor_id()
        self.who = actor_id or f"driver-{ctx.get_job_id()}-{id(self):x}"
        self.claimant = ctx.current_actor if actor_id else None  # probed by the registry for liveness
        self.held: list[Any] = []  # ObjectRefs this process owns and published
        self.unavailable: str | None = None  # why the registry cannot be used, once it failed
        self.fetches: list[dict[str, Any]] = []
        self.fallbacks: list[dict[str, str]] = []
        self.rejected = 0
        self.published = 0
        self.wait_seconds = 0.0
        self._factors_sent: set[str] = set()
        self._no_fetch: set[tuple[str, str]] = set()

    # ----- the three moments of a miss -----

    def obtain(self, cache_key: str, graph_key: str) -> Fetched | None:
        """The graph's verified bytes from another node, or None: compile it here (then call
        publish() or failed()). A None after a failure has recorded its reason."""
        if self.unavailable is not None:
            return self._fallback(graph_key, self.unavailable)
        if (cache_key, graph_key) in self._no_fetch:
            return None
        deadline = time.monotonic() + self.settings.wait_s
        waited_from = None
        try:
            while True:
                answer = self._call(self.registry.ask.remote(cache_key, graph_key, self.node, self.who, self.claimant))
                if answer is None:
                    return self._fallback(graph_key, self.unavailable or "registry unavailable")
                if answer["action"] == "compile":
                    return None
                if answer["action"] == "fetch":
                    return self.fetch(cache_key, graph_key, answer)
                assert answer["action"] == "wait", answer
                waited_from = waited_from or time.monotonic()
                if time.monotonic() > deadline:
                    return self._fallback(graph_key, f"waited {self.settings.wait_s:g} s for node "
                                                     f"{answer['node']}'s compile")
                time.sleep(self.settings.poll_s)
        finally:
            if waited_from is not None:
                self.wait_seconds += time.monotonic() - waited_from

    def publish(self, cache_key: str, graph_key: str, data: bytes, factors: dict, *, offer: bool = False) -> bool:
        """Put `data` into the object store (owned by this process) and register it. offer=True
        (a local cache hit): only if the cluster lacks it, asked first so no bytes are copied
        for nothing. True if this rank's copy is the one the registry now names."""
        import ray

        if self.unavailable is not None:
            return False
        if offer:
            wanted = self._call(self.registry.wants.remote(cache_key, graph_key))
            if not wanted:
                return False
        ref = ray.put(bytes(data))
        send_factors = factors if cache_key not in self._factors_sent else None
        accepted = self._call(self.registry.publish.remote(
            cache_key, graph_key, digest_bytes(data), len(data), self.node, self.who, [ref], send_factors))
        if accepted is None:
            return False
        self._factors_sent.add(cache_key)
        if accepted:
            self.held.append(ref)  # keeps the object alive for consumers as long as we live
            self.published += 1
        return bool(accepted)

    def failed(self, cache_key: str, graph_key: str) -> None:
        """This rank's compile of a graph it claimed raised: let waiting nodes compile it."""
        if self.unavailable is None:
            self._call(self.registry.release.remote(cache_key, graph_key, self.who))

    def unusable(self, cache_key: str, graph_key: str, digest: str, reason: str) -> None:
        """Fetched bytes that verified but do not load: never fetch this graph again, and tell
        the registry so that no other node tries the same copy."""
        self._no_fetch.add((cache_key, graph_key))
        self._fallback(graph_key, f"artifact from the cluster unusable: {reason}")
        if self.unavailable is None:
            self._call(self.registry.forget.remote(cache_key, graph_key, digest, reason))

    def fetch(self, cache_key: str, graph_key: str, answer: dict[str, Any]) -> Fetched | None:
        """The bytes of a publication (a registry "fetch" answer or listing() item), verified:
        same cache key and graph, right size and digest. None (reason recorded) otherwise."""
        import ray

        source, digest = answer["node"], answer["digest"]
        if answer.get("cache_key") != cache_key or answer.get("graph_key") != graph_key:
            return self._reject(cache_key, graph_key, digest, f"node {source} offered an artifact of another "
                                f"cache key or graph ({answer.get('cache_key')}/{answer.get('graph_key')})")
        t0 = time.perf_counter()
        try:
            data = ray.get(answer["ref"][0], timeout=self.settings.fetch_s)
        except ray.exceptions.GetTimeoutError:
            return self._lost(cache_key, graph_key, digest, f"fetch from node {source} took over "
                                                            f"{self.settings.fetch_s:g} s")
        except ray.exceptions.RayError as exc:  # OwnerDiedError, ObjectLostError, ...
            return self._lost(cache_key, graph_key, digest, f"fetch from node {source} failed: "
                                                            f"{type(exc).__name__} (producer gone?)")
        seconds = time.perf_counter() - t0
        if not isinstance(data, bytes) or len(data) != answer["size"] or digest_bytes(data) != digest:
            return self._reject(cache_key, graph_key, digest, f"blob from node {source} does not match its "
                                                              f"digest {digest}: rejected")
        self.fetches.append({"graph_key": graph_key, "bytes": len(data), "seconds": seconds, "node": source})
        return Fetched(data, source, seconds)

    # ----- internals -----

    def _reject(self, cache_key: str, graph_key: str, digest: str, reason: str) -> None:
        self.rejected += 1
        return self._lost(cache_key, graph_key, digest, reason)

    def _lost(self, cache_key: str, graph_key: str, digest: str, reason: str) -> None:
        if self.unavailable is None:
            self._call(self.registry.forget.remote(cache_key, graph_key, digest, reason))
        return self._fallback(graph_key, reason)

    def _fallback(self, graph_key: str, reason: str) -> None:
        self.fallbacks.append({"graph_key": graph_key, "reason": reason})
        return None

    def _call(self, ref: Any) -> Any:
        """A registry call's answer, or None once the registry is found killed or unreachable."""
        import ray

        try:
            return ray.get(ref, timeout=self.settings.call_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as exc:
            self.unavailable = f"registry unavailable ({type(exc).__name__})"
            return None

    def report(self) -> dict[str, Any]:
        """What fan-out did for this rank, for the worker's report."""
        return {
            "fetched": len(self.fetches),
            "bytes_fetched": sum(f["bytes"] for f in self.fetches),
            "fetch_seconds": sum(f["seconds"] for f in self.fetches),
            "sources": dict(Counter(f["node"] for f in self.fetches)),
            "fetches": list(self.fetches),
            "wait_seconds": self.wait_seconds,
            "published": self.published,
            "rejected": self.rejected,
            "fallbacks": list(self.fallbacks),
            "registry": self.unavailable or "ok",
            "node_id": self.node,
        }


class ClusterStep:
    """One graph's miss, for PiecewiseBackend: compute() goes to the cluster before compiling;
    after() offers a local hit to the cluster. `fetched` says whether the bytes came from
    another node (then nothing was compiled, and the caller loads them)."""

    def __init__(self, client: FanoutClient | None, entry: Any, graph_key: str, compile_fn: Callable[[], bytes],
                 warnings: list[str]):
        self.client, self.entry, self.graph_key = client, entry, graph_key
        self.compile_fn, self.warnings = compile_fn, warnings
        self.fetched: Fetched | None = None

    def compute(self) -> bytes:
        client, key = self.client, self.entry.key
        if client is None:
            return self.compile_fn()
        before = len(client.fallbacks)
        self.fetched = client.obtain(key, self.graph_key)
        self._warn_new_fallbacks(before)
        if self.fetched is not None:
            return self.fetched.data
        try:
            data = self.compile_fn()
        except BaseException:
            client.failed(key, self.graph_key)
            raise
        client.publish(key, self.graph_key, data, self.entry.factors)
        return data

    def after(self, data: bytes, computed: bool) -> None:
        if self.client is not None and not computed:
            self.client.publish(self.entry.key, self.graph_key, data, self.entry.factors, offer=True)

    def unusable(self, digest: str, reason: str) -> None:
        if self.client is not None and self.fetched is not None:
            before = len(self.client.fallbacks)
            self.client.unusable(self.entry.key, self.graph_key, digest, reason)
            self._warn_new_fallbacks(before)

    def _warn_new_fallbacks(self, before: int) -> None:
        assert self.client is not None
        for f in self.client.fallbacks[before:]:
            self.warnings.append(f"fan-out: compiled locally: {f['reason']}")
