"""Ray side of the driver: start or attach to a cluster, reserve one bundle per rank.

An embedded cluster (address=None) is bound to 127.0.0.1 and sends nothing elsewhere; "auto"
or an address attaches to a running cluster (`ray submit`, `ray job submit`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

LOOPBACK = "127.0.0.1"
# Ray 2.60 keeps a local cluster on loopback when this is "0" in the environment of the processes
# it starts (raylet, workers: they read it when they import Ray).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class Cluster:
    started_here: bool
    """kiln started this Ray instance (and shuts it down)."""
    seconds: float
    """Time to start or attach."""


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None,
            runtime_env: dict[str, Any] | None = None) -> Cluster:
    import ray

    t0 = time.perf_counter()
    if ray.is_initialized():
        return Cluster(False, 0.0)
    if address is None:
        # Set only for the embedded cluster, right before it starts (never at import: attaching to
        # a real multi-node cluster must not be forced onto loopback). The cluster's processes
        # inherit it; this process may have read Ray's constants already, hence _node_ip_address.
        # (A user's explicit value is kept.)
        os.environ.setdefault(LOOPBACK_SWITCH, "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                  "_node_ip_address": LOOPBACK,
                                  "configure_logging": True, "logging_level": "warning"}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        # address="local": always a fresh cluster, never one named by $RAY_ADDRESS or left
        # running by an earlier `ray start` (which plain ray.init() would silently attach to).
        # Ray ships the driver's working directory to local workers' sys.path already.
        ray.init(address="local", **kwargs)
        return Cluster(True, time.perf_counter() - t0)
    # runtime_env (e.g. {"working_dir": …}) ships the model's code to every node; inside a
    # `ray job submit --working-dir` job the job's own runtime env already does that.
    ray.init(address=address, log_to_driver=True, logging_level="warning",
             **({"runtime_env": runtime_env} if runtime_env else {}))
    return Cluster(False, time.perf_counter() - t0)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def wants_gpus(device: str, cluster_gpus: int, tp_size: int) -> bool:
    """Whether ranks get GPU bundles: always for "cuda"; for "auto" only when the cluster has a
    GPU for every rank (fewer would leave the placement group waiting for GPUs that never come)."""
    return device == "cuda" or (device == "auto" and cluster_gpus >= tp_size)


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node (what could ever be reserved, not what is free now)."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def rank_bundle(use_gpu: bool, cpus_per_rank: float) -> dict[str, float]:
    """The resources one rank reserves."""
    return {"GPU": 1, "CPU": cpus_per_rank} if use_gpu else {"CPU": cpus_per_rank}


def _ranks_per_node(node: dict[str, float], bundle: dict[str, float], cap: int) -> int:
    """How many bundles fit on `node` at once, at most `cap` (a bundle of zeros fits any number)."""
    # The epsilon keeps 1.5 CPUs / 0.5 per rank from flooring to 2 through float error.
    fits = [int(node.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min([cap, *fits])


def placement_shortfall(tp_size: int, bundle: dict[str, float], strategy: str,
                        nodes: list[dict[str, float]]) -> str | None:
    """Why `tp_size` bundles can never be placed with `strategy` on `nodes` (their total
    resources, as from alive_nodes()), or None if they can once the nodes are free."""
    per_node = [_ranks_per_node(n, bundle, tp_size) for n in nodes]
    if strategy == "STRICT_PACK":
        best = max(per_node, default=0)
        if best >= tp_size:
            return None
        why = f"STRICT_PACK needs one node with room for all {tp_size} ranks; the roomiest fits {best}"
    elif strategy == "STRICT_SPREAD":
        usable = sum(1 for n in per_node if n >= 1)
        if usable >= tp_size:
            return None
        why = f"STRICT_SPREAD needs {tp_size} nodes with room for one rank each; the cluster has {usable}"
    else:  # PACK, SPREAD: ranks may share a node
        room = sum(per_node)
        if room >= tp_size:
            return None
        why = f"the nodes have room for {room} of the {tp_size} ranks"
    totals = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}
    return (f"cannot place tp={tp_size} ranks of {bundle} with placement {strategy}: {why} "
            f"(cluster: {len(nodes)} node(s), {totals['CPU']:g} CPU and {totals['GPU']:g} GPU in all)")


def reserve(tp_size: int, use_gpu: bool, cpus_per_rank: float, strategy: str, timeout_s: float) -> Any:
    """A placement group of one bundle per rank; raises with what is missing if it can't be had."""
    import ray
    from ray.util.placement_group import placement_group

    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    bundle = rank_bundle(use_gpu, cpus_per_rank)
    pg = placement_group([dict(bundle) for _ in range(tp_size)], strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)
        have = ray.available_resources()
        raise RuntimeError(
            f"cannot place {tp_size} ranks of {bundle} ({strategy}) within {timeout_s:.0f} s; "
            f"cluster has {{'CPU': {have.get('CPU', 0)}, 'GPU': {have.get('GPU', 0)}}} available")
    return pg
