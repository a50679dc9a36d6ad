"""Lazy CUDA graph capture on a GPU (run on the device: pytest -m cuda tests/cuda/test_lazy_capture.py).

Against an eager-capture twin (same weights, same config but cudagraph_capture="eager"), for
PIECEWISE and FULL_AND_PIECEWISE: outputs are equal for every batch size, while the capture
thread is held before a size (so some sizes are captured and some are not), while it runs
freely next to a busy main thread, and after it has finished; every size is captured
eventually, on the capture thread's stream; the summary says when. The CPU tests
(tests/backend/test_lazy_capture.py) cover the rest of the contract with a fake capture.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytestmark = pytest.mark.cuda

SIZES = [1, 2, 4, 8, 16, 24, 32]
MODEL = {"layers": 3, "hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 512, "max_seq_len": 64,
         "max_seqs": 48, "dtype": "float32", "device": "cuda"}
BATCHES = [1, 2, 3, 4, 5, 8, 13, 16, 20, 24, 32, 40]  # captured, padded, above the largest
TOL = {"rtol": 2e-4, "atol": 2e-4}


def _make(mode: str, capture: str, cache_root):
    from examples.toy_llama import build
    from kiln.cache import CacheStore
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(cudagraph_mode=mode, cudagraph_copy_inputs=True, cudagraph_capture=capture)
    with building_with(config):
        model = build(**MODEL)
    torch._dynamo.reset()  # several models trace the same forward in this process
    kiln = KilnModel(model, config, store=CacheStore(cache_root))
    kiln.compile(SIZES)
    return kiln


def _batch(n: int, decode: bool):
    if decode:
        return (torch.arange(n, device="cuda") % 500, torch.full((n,), 17, device="cuda"),
                torch.arange(n, device="cuda"))
    return (torch.arange(n, device="cuda") % 500, torch.arange(n, device="cuda") % 60,
            torch.zeros(n, dtype=torch.long, device="cuda"))


def _run(kiln, n: int, decode: bool) -> torch.Tensor:
    kiln.model.reset_cache()
    with torch.no_grad():
        history = (torch.arange(16, device="cuda") % 7, torch.arange(16, device="cuda") % 3 + 16,
                   torch.arange(16, device="cuda"))
        kiln(*kiln.place(*history), decode=False)
        return kiln(*kiln.place(*_batch(n, decode)), decode=decode).clone()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-lazy-cache")


@pytest.mark.parametrize("mode", ["PIECEWISE", "FULL_AND_PIECEWISE"])
def test_lazy_capture_matches_eager_capture(mode, cache_root, monkeypatch):
    from kiln.workers.runtime.cudagraphs import GraphPool

    eager = _make(mode, "eager", cache_root)
    expected = {(n, d): _run(eager, n, d) for n in BATCHES for d in (True, False)}

    # Hold the capture thread before its first capture of size 8 (1, 2 and 4 are done by then).
    held, release = threading.Event(), threading.Event()
    original = GraphPool._capture_on_stream

    def holding(self, kind, size, fn):
        if size == 8 and not release.is_set():
            held.set()
            release.wait(120)
        return original(self, kind, size, fn)

    monkeypatch.setattr(GraphPool, "_capture_on_stream", holding)
    lazy = _make(mode, "lazy", cache_root)
    try:
        assert held.wait(120), "the capture thread never reached size 8"
        assert lazy.lazy.running and 8 not in lazy._piecewise_graphed and 4 in lazy._piecewise_graphed
        for (n, d), want in expected.items():  # some sizes on graphs, some not, all while held
            torch.testing.assert_close(_run(lazy, n, d), want, **TOL, msg=f"{mode} held n={n} decode={d}")
        assert not release.is_set() and lazy.lazy.running  # nothing waited for the held capture
    finally:
        release.set()
    # The capture thread runs freely now, next to a main thread that keeps serving.
    rounds = 0
    while lazy.lazy.running and rounds < 200:
        for (n, d), want in expected.items():
            torch.testing.assert_close(_run(lazy, n, d), want, **TOL, msg=f"{mode} during n={n} decode={d}")
        rounds += 1
    assert lazy.lazy.wait(300), "lazy capture did not finish"
    torch.cuda.synchronize()
    for (n, d), want in expected.items():
        torch.testing.assert_close(_run(lazy, n, d), want, **TOL, msg=f"{mode} after n={n} decode={d}")
    assert lazy._piecewise_graphed == frozenset(SIZES)
    if mode == "FULL_AND_PIECEWISE":
        assert sorted(lazy.full_graphs) == SIZES
    summary = lazy.capture_summary()
    assert summary["captured"] == len(SIZES) and not summary["failed"] and summary["done"], summary
    assert [e["size"] for e in summary["per_size"]] == SIZES  # smallest first
    assert all(e["after_ready_s"] > 0 for e in summary["per_size"])
    assert not lazy.record.warnings or all("lazy capture" not in w for w in lazy.record.warnings)
    assert lazy.close(30)


def test_lazy_capture_of_a_failing_size_runs_it_without_graphs(cache_root, monkeypatch):
    from kiln.workers.runtime.cudagraphs import GraphPool

    eager = _make("FULL_AND_PIECEWISE", "eager", cache_root)
    original = GraphPool._capture_on_stream

    def failing(self, kind, size, fn):
        if size == 4:
            raise RuntimeError("injected failure at size 4")
        return original(self, kind, size, fn)

    monkeypatch.setattr(GraphPool, "_capture_on_stream", failing)
    lazy = _make("FULL_AND_PIECEWISE", "lazy", cache_root)
    assert lazy.lazy.wait(300)
    summary = lazy.capture_summary()
    assert set(summary["failed"]) == {4} and summary["captured"] == len(SIZES) - 1
    for n in (3, 4):
        for d in (True, False):
            torch.testing.assert_close(_run(lazy, n, d), _run(eager, n, d), **TOL)
    lazy.close()
