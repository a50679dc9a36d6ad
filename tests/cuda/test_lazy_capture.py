"""Lazy CUDA graph capture on a GPU (run on the device: pytest -m cuda tests/cuda/test_lazy_capture.py).

Against an eager-capture twin (same weights, same config but cudagraph_capture="eager"), for
PIECEWISE, FULL_AND_PIECEWISE and FULL: outputs are equal for every batch size, while the capture
thread is held before a size (so some sizes are captured and some are not), while it runs
freely next to a busy main thread, and after it has finished; every size is captured
eventually, on the capture thread's stream; the summary says when. The CPU tests
(tests/backend/test_lazy_capture.py) cover the rest of the contract with a fake capture.

Every model a test makes is closed at teardown, pass or fail (`models`), and garbage is
collected before a test makes its first model: a failed test's lazy model would otherwise keep
capturing (pytest keeps the traceback, hence the model) next to the next test, and the graphs of
earlier tests would be freed by the collector at some arbitrary point of the next one. A
mismatch reports the batch, the phase, the routine and padded size it took, the largest
difference and the rows that differ, and which sizes were captured just before and just after
the call, with each size's capture state.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch

pytestmark = pytest.mark.cuda

SIZES = [1, 2, 4, 8, 16, 24, 32]
MODEL = {"layers": 3, "hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 512, "max_seq_len": 64,
         "max_seqs": 48, "dtype": "float32", "device": "cuda"}
BATCHES = [1, 2, 3, 4, 5, 8, 13, 16, 20, 24, 32, 40]  # captured, padded, above the largest
TOL = {"rtol": 2e-4, "atol": 2e-4}


def _make(mode: str, capture: str, cache_root, models: list):
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
    models.append(kiln)  # closed at teardown (the `models` fixture), even if compile() raises
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


@pytest.fixture
def models():
    """The KilnModels a test makes; each lazy one is closed (its thread joined) at teardown,
    pass or fail, before the next test makes any."""
    gc.collect()  # earlier tests' graphs die here, not on a capture thread in mid-capture
    torch.cuda.synchronize()
    made: list = []
    yield made
    alive = []
    for kiln in made:
        if not kiln.close(120):
            alive.append(kiln.lazy.summary())
    made.clear()
    torch.cuda.synchronize()
    gc.collect()
    assert not alive, f"lazy capture threads still running after close(): {alive}"


def _state(lazy) -> str:
    """What is captured right now: published sizes and each size's capture state."""
    states = {s: e.state for s, e in lazy.lazy.sizes.items()} if lazy.lazy is not None else {}
    failed = {s: e.error for s, e in lazy.lazy.sizes.items() if e.error} if lazy.lazy is not None else {}
    return (f"piecewise graphs {sorted(lazy._piecewise_graphed)}, full graphs {sorted(lazy.full_graphs)}, "
            f"states {states}" + (f", failed {failed}" if failed else ""))


def _route(kiln, n: int, decode: bool) -> str:
    if not kiln.uses_graphs(n):
        return "no graphs (above the largest size)"
    size = kiln.config.bs_to_padded_graph_size[n]
    routine = kiln.mode.decode_mode() if decode else kiln.mode.mixed_mode()
    return f"padded size {size}, routine {routine.name}"


def _check(lazy, n: int, decode: bool, want: torch.Tensor, where: str) -> None:
    before = _state(lazy)
    got = _run(lazy, n, decode)
    after = _state(lazy)
    if got.shape == want.shape and torch.allclose(got, want, **TOL):
        return
    diff = (got - want).abs().nan_to_num(float("inf"))
    bad_rows = (~torch.isclose(got, want, **TOL)).any(dim=-1).nonzero().flatten().tolist()
    detail = (f"{lazy.mode.name} {where}: batch n={n} decode={decode} ({_route(lazy, n, decode)}): "
              f"max abs diff {diff.max().item():.3e} (max |want| {want.abs().max().item():.3e}), "
              f"NaN in output: {bool(got.isnan().any())}, rows differing {bad_rows} of {n}\n"
              f"  captured before the call: {before}\n  captured after the call:  {after}\n"
              f"  warnings: {lazy.record.warnings}")
    print(detail)  # also in the captured stdout, next to the other mismatches of a run
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{m}\n{detail}")


@pytest.mark.parametrize("mode", ["PIECEWISE", "FULL_AND_PIECEWISE", "FULL"])
def test_lazy_capture_matches_eager_capture(mode, cache_root, models, monkeypatch):
    from kiln.workers.runtime.cudagraphs import GraphPool

    eager = _make(mode, "eager", cache_root, models)
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
    try:
        lazy = _make(mode, "lazy", cache_root, models)
        assert held.wait(120), "the capture thread never reached size 8"
        published = frozenset(lazy.full_graphs) if mode == "FULL" else lazy._piecewise_graphed
        assert lazy.lazy.running and 8 not in published and 4 in published, _state(lazy)
        for (n, d), want in expected.items():  # some sizes on graphs, some not, all while held
            _check(lazy, n, d, want, "held before size 8")
        assert not release.is_set() and lazy.lazy.running  # nothing waited for the held capture
    finally:
        release.set()
    # The capture thread runs freely now, next to a main thread that keeps serving.
    rounds = 0
    while lazy.lazy.running and rounds < 200:
        for (n, d), want in expected.items():
            _check(lazy, n, d, want, f"during capture (round {rounds})")
        rounds += 1
    assert lazy.lazy.wait(300), f"lazy capture did not finish: {_state(lazy)}"
    torch.cuda.synchronize()
    for (n, d), want in expected.items():
        _check(lazy, n, d, want, "after capture")
    if mode != "FULL":
        assert lazy._piecewise_graphed == frozenset(SIZES), _state(lazy)
    if mode != "PIECEWISE":
        assert sorted(lazy.full_graphs) == SIZES, _state(lazy)
    summary = lazy.capture_summary()
    assert summary["captured"] == len(SIZES) and not summary["failed"] and summary["done"], summary
    assert [e["size"] for e in summary["per_size"]] == SIZES  # smallest first
    assert all(e["after_ready_s"] > 0 for e in summary["per_size"])
    assert not lazy.record.warnings or all("lazy capture" not in w for w in lazy.record.warnings), \
        lazy.record.warnings
    assert lazy.close(30)


def test_lazy_capture_of_a_failing_size_runs_it_without_graphs(cache_root, models, monkeypatch):
    from kiln.workers.runtime.cudagraphs import GraphPool

    eager = _make("PIECEWISE", "eager", cache_root, models)
    original = GraphPool._capture_on_stream

    def failing(self, kind, size, fn):
        if size == 4:
            raise RuntimeError("injected failure at size 4")
        return original(self, kind, size, fn)

    monkeypatch.setattr(GraphPool, "_capture_on_stream", failing)
    lazy = _make("PIECEWISE", "lazy", cache_root, models)
    assert lazy.lazy.wait(300)
    summary = lazy.capture_summary()
    assert set(summary["failed"]) == {4} and summary["captured"] == len(SIZES) - 1, summary
    for n in (3, 4):
        for d in (True, False):
            _check(lazy, n, d, _run(eager, n, d), "after a failed size 4")
    assert lazy.close()
