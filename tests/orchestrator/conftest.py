"""One local Ray cluster (127.0.0.1, 4 CPUs) shared by the orchestrator tests of a module."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from kiln.orchestrator.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(None, num_cpus=4)
    yield
    ray.shutdown()


# A one-layer example model keeps CPU compiles short: 3 pieces, 2 of them compiled.
TINY = {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 2, "vocab": 64, "max_seq_len": 16, "max_seqs": 4}
