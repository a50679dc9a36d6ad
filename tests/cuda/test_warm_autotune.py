"""Nothing is tuned twice: what Triton's autotuner measured in a cold process travels with the
artifacts, so a warm process (same kiln cache, empty Inductor and Triton caches) benchmarks
nothing and computes the same outputs. Run on the device: pytest -m cuda.

Each process is a fresh child (autotune_child.py) with its own empty TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR, so torch's own caches cannot serve the warm one: only kiln's artifacts can.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.backend.conftest import run_child

pytestmark = pytest.mark.cuda

CHILD = Path(__file__).with_name("autotune_child.py")


def test_a_warm_process_benchmarks_nothing_and_matches(tmp_path):
    root = tmp_path / "kiln-cache"
    cold = run_child({"root": str(root)}, tmp_path, child=CHILD)
    # Positive control: without autotuning in the cold process, 0 in the warm one proves nothing.
    assert cold["compiles"] > 0
    assert cold["benchmarks"] > 0, "the model made Inductor autotune nothing: pick kernels with several configs"
    assert cold["record_benchmarks"] > 0, "the compile record did not count the cold process's autotuning"
    assert not [w for w in cold["warnings"] if "autotuning run" in w], cold["warnings"]

    warm = run_child({"root": str(root)}, tmp_path, child=CHILD)
    assert warm["compiles"] == 0 and warm["loaded"] == cold["compiles"]
    assert warm["benchmarks"] == 0, f"a warm process autotuned {warm['benchmarks']} times"
    assert warm["record_benchmarks"] == 0
    assert warm["outputs"].keys() == cold["outputs"].keys()
    for n in cold["outputs"]:
        torch.testing.assert_close(torch.tensor(warm["outputs"][n]), torch.tensor(cold["outputs"][n]),
                                   rtol=1e-4, atol=1e-4)
