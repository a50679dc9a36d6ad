"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster) for tests, bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Keeps Ray's local clusters on 127.0.0.1 on these machines; must be set before Ray starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@contextlib.contextmanager
def simulated_cluster(cpus_per_node: list[int]) -> Iterator:
    """A head node plus one worker node per further entry, each with that many logical CPUs;
    the driver is connected to it. Yields the Cluster; shuts Ray and the cluster down after."""
    import ray
    from ray.cluster_utils import Cluster

    assert cpus_per_node and all(n >= 1 for n in cpus_per_node), cpus_per_node
    if ray.is_initialized():
        ray.shutdown()  # a module-scoped cluster of another test module
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node[0]})
    try:
        for cpus in cpus_per_node[1:]:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
