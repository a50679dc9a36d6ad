"""Cluster fan-out, driver side: find or start the registry, hand it to the ranks, sum up.

`fanout="auto"` (the default) turns fan-out on when the ranks span more than one node, or when
the cluster already has a registry (another job's, or a cluster-lifetime one that serving
replicas join); "on" always starts or joins one; "off" never does. The registry itself lives in
orchestrator/registry.py, the rank side in workers/fanout.py.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kiln.orchestrator.registry import LIFETIMES, registry_actor

MODES = ("auto", "on", "off")
MIB = 1 << 20

log = logging.getLogger("kiln.driver")


@dataclasses.dataclass
class Fanout:
    """The registry a job's ranks use, and whether this driver must remove it afterwards."""

    registry: Any
    created_here: bool
    lifetime: str
    settings: dict[str, float]

    def payload(self) -> dict[str, Any]:
        """The set-up payload's "fanout" part (workers.fanout.make_client reads it)."""
        return {"registry": self.registry, **self.settings}

    def teardown(self, producers: list[str]) -> None:
        """The job's workers are going away and their objects with them: drop what they
        published; remove a job-lifetime registry this driver started."""
        import ray

        try:
            ray.get(self.registry.forget_producers.remote(producers), timeout=10)
        except Exception as exc:  # noqa: BLE001 - killed or unreachable: nothing left to tidy
            log.debug("fan-out registry unreachable at teardown: %s", exc)
        if self.created_here and self.lifetime == "job":
            try:
                ray.kill(self.registry, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def check_options(mode: str, lifetime: str, wait_s: float) -> None:
    if mode not in MODES:
        raise ValueError(f"fanout must be one of {', '.join(MODES)}, got {mode!r}")
    if lifetime not in LIFETIMES:
        raise ValueError(f"fanout_lifetime must be one of {', '.join(LIFETIMES)}, got {lifetime!r}")
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or wait_s < 0:
        raise ValueError(f"fanout_wait_s must be a non-negative number of seconds, got {wait_s!r}")


def start_fanout(mode: str, lifetime: str, node_ids: list[str], wait_s: float) -> Fanout | None:
    """The job's Fanout, or None when fan-out stays off (see the module docstring); `node_ids`:
    the node of each rank."""
    if mode == "off":
        return None
    create = mode == "on" or len(set(node_ids)) > 1
    registry, created = registry_actor(lifetime, create=create)
    if registry is None:
        return None
    return Fanout(registry, created, lifetime, {"wait_s": float(wait_s)})


# ----- the report -----

def unique_graphs(ranks: list[dict]) -> int:
    """Distinct graph keys the ranks compiled, loaded or fetched."""
    keys = {p.get("extra", {}).get("graph_key") for r in ranks for p in r.get("phases") or ()
            if p.get("name", "").startswith(("compile piece", "load piece", "fetch piece"))}
    return len(keys - {None})


def fanout_summary(ranks: list[dict]) -> dict[str, Any] | None:
    """Per job: compiles across the cluster against unique graphs, fetches, fallbacks; None
    when no rank used fan-out."""
    used = [r["fanout"] for r in ranks if r.get("fanout")]
    if not used:
        return None
    return {
        "compiles": sum(r.get("inductor_compiles") or 0 for r in ranks),
        "unique_graphs": unique_graphs(ranks),
        "fetched": sum(f["fetched"] for f in used),
        "bytes_fetched": sum(f["bytes_fetched"] for f in used),
        "fetch_seconds": sum(f["fetch_seconds"] for f in used),
        "wait_seconds": sum(f["wait_seconds"] for f in used),
        "rejected": sum(f["rejected"] for f in used),
        "fallbacks": sum(len(f["fallbacks"]) for f in used),
    }


def fanout_lines(ranks: list[dict]) -> list[str]:
    """Footer lines of the run report's table: the job's summary, then one line per rank."""
    summary = fanout_summary(ranks)
    if summary is None:
        return []
    lines = [f"fan-out:     {summary['compiles']} compiles across the cluster for {summary['unique_graphs']} unique "
             f"graphs; {summary['fetched']} fetched ({summary['bytes_fetched'] / MIB:.2f} MiB), "
             f"{summary['rejected']} rejected, {summary['fallbacks']} fallbacks"]
    for r in ranks:
        f = r.get("fanout")
        if not f:
            continue
        sources = ", ".join(f"{n} from {node}" for node, n in sorted(f["sources"].items())) or "none"
        causes = sorted({x["reason"] for x in f["fallbacks"]})
        lines.append(
            f"  rank {r.get('rank', '?')}: compiled {r.get('inductor_compiles') or 0}, loaded locally "
            f"{r.get('artifacts_loaded') or 0}, fetched {f['fetched']} ({f['bytes_fetched'] / MIB:.2f} MiB in "
            f"{f['fetch_seconds']:.2f} s; {sources}), waited {f['wait_seconds']:.2f} s, published {f['published']}, "
            f"fallbacks {len(f['fallbacks'])}{': ' + '; '.join(causes) if causes else ''}")
    return lines
