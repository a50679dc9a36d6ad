"""Skew: a worker whose toolchain differs from the driver's, and a cache written by another build.

A worker whose torch, kiln, Python or device type differs from the driver's refuses before it
opens the cache, naming the factor and both values. Artifacts of another build (here: another
torch version) live under another cache key: never loaded, never touched.
"""

from __future__ import annotations

import json

import pytest

from tests.orchestrator.conftest import TINY
from tests.reliability.support import MODEL, UNIQUE_PIECES, cli, run_child, snapshot, verify_clean

pytestmark = pytest.mark.reliability

MAX_ERR = 1e-3
OTHER_TORCH = "2.11.0+cu130"

SKEWED = {"torch": OTHER_TORCH, "kiln": "0.0.1+other", "python": "3.9", "device": "cuda"}


# CI refuses a torch and a device skew; kiln and Python are the same code path (-m slow).
@pytest.mark.parametrize("factor", [pytest.param(f, marks=() if f in ("torch", "device") else pytest.mark.slow)
                                    for f in SKEWED])
def test_worker_with_another_toolchain_is_refused(ray_local, tmp_path, monkeypatch, figure, factor):
    import kiln.orchestrator.driver as driver
    from kiln import CompilationConfig, Orchestrator
    from kiln.orchestrator.driver import WarmupError

    figure.scenario = f"skew: worker's {factor} differs from the driver's"
    real = driver.driver_factors
    monkeypatch.setattr(driver, "driver_factors", lambda device: {**real(device), factor: SKEWED[factor]})
    root = tmp_path / "root"
    figure.fault()
    with Orchestrator(MODEL, 1, CompilationConfig(), str(root), model_kwargs=TINY, progress=False) as orch:
        with pytest.raises(WarmupError) as info:
            orch.warmup([2])
    (failure,) = info.value.failures
    assert failure["phase"] == "verify"
    assert f"{factor} differs" in failure["cause"] and repr(SKEWED[factor]) in failure["cause"]
    assert not root.exists(), "a refused worker must not open the cache"
    figure.recovered()


def test_cache_of_another_build_is_never_loaded(cache_copy, tmp_path, figure):
    figure.scenario = "skew: cache written by another torch build"
    root, cold = cache_copy
    old_key = cold["key"]
    # The old entry alone (the root also holds the cached Dynamo trace's entry, which another
    # torch keys apart too).
    before = {k: v for k, v in snapshot(root).items() if k.split("/")[0] == old_key}
    figure.fault()

    # The same model and config, compiled by a "torch" that reports another version.
    result = run_child({"root": str(root), "compiler_factors": {"torch": OTHER_TORCH}}, tmp_path)
    record = result["record"]
    new_key = record["cache_key"]
    assert new_key != old_key
    assert (record["cache_hits"], record["inductor_compiles"]) == (0, UNIQUE_PIECES)
    assert result["max_err"] < MAX_ERR
    assert {k: v for k, v in snapshot(root).items() if k.split("/")[0] == old_key} == before, "old entry touched"
    assert json.loads((root / new_key / "key_factors.json").read_text())["compiler"]["torch"] == OTHER_TORCH

    explained = cli("cache", "explain", "--root", str(root), old_key, new_key)
    assert explained.exit_code == 0 and "compiler.torch" in explained.output, explained.output
    verify_clean(root)
    figure.recovered()

