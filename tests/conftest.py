"""Suite-wide switches: CUDA tests skip without a GPU; slow tests run only when asked (-m slow);
Hypothesis keeps nothing in the source tree (tests/hygiene.py). And the one local Ray cluster
fixture (127.0.0.1, 4 CPUs) that a test module shares."""

from __future__ import annotations

import pytest

from tests.hygiene import keep_hypothesis_out_of_the_tree, marker_names, remove

_HYPOTHESIS_HOME = keep_hypothesis_out_of_the_tree()


def pytest_collection_modifyitems(config, items):
    import torch

    slow_asked = "slow" in marker_names(config.getoption("-m") or "")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m cuda)")
    skip_slow = pytest.mark.skip(reason="slow: run on demand with -m slow")
    for item in items:
        # Markers by name, exactly (item.keywords also holds test, module and parameter names).
        if item.get_closest_marker("cuda") and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if item.get_closest_marker("slow") and not slow_asked:
            item.add_marker(skip_slow)


def pytest_unconfigure(config):
    remove(_HYPOTHESIS_HOME)


@pytest.fixture(scope="module")
def ray_cluster():
    """One embedded Ray cluster for the module (start/stop costs seconds), on loopback."""
    import ray

    from kiln.orchestrator.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect(None, num_cpus=4)
    yield
    ray.shutdown()
