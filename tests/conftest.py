"""Suite-wide switches: CUDA tests skip without a GPU; slow tests run only when asked (-m slow)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    selected = config.getoption("-m") or ""
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m cuda)")
    skip_slow = pytest.mark.skip(reason="slow: run on demand with -m slow")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and "slow" not in selected:
            item.add_marker(skip_slow)
