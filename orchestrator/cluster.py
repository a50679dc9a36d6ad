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

# Read by Ray when it is first imported: keeps a local cluster on loopback (Ray 2.60). Set here,
# at import, because any `import ray` after this module is imported must see it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
LOOPBACK = "127.0.0.1"


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
        # _node_ip_address too, in case ray was imported before the variable above was set.
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                  "_node_ip_address": LOOPBACK,
                                  "configure_logging": True, "logging_level": "warning"}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            kwargs["num_gpus"] = num_gpus
        # Ray ships the driver's working directory to local workers' sys.path already.
        ray.init(**kwargs)
        return Cluster(True, time.perf_counter() - t0)
    # runtime_env (e.g. {"working_dir": …}) ships the model's code to every node; inside a
    # `ray job submit --working-dir` job the job's own runtime env already does that.
    ray.init(address=address, log_to_driver=True, logging_level="warning",
             **({"runtime_env": runtime_env} if runtime_env else {}))
    return Cluster(False, time.perf_counter() - t0)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def reserve(tp_size: int, use_gpu: bool, cpus_per_rank: float, strategy: str, timeout_s: float) -> Any:
    """A placement group of one bundle per rank; raises with what is missing if it can't be had."""
    import ray
    from ray.util.placement_group import placement_group

    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    bundle = {"GPU": 1, "CPU": cpus_per_rank} if use_gpu else {"CPU": cpus_per_rank}
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
