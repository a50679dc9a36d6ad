"""Lazy CUDA graph capture's contract, on the CPU, with a fake capture standing in for CUDA's.

`FakePool` stands in for GraphPool: capture(kind, size, fn) records the order and runs fn once
(its result plays the graph's static output), and a replay runs fn again into those same output
tensors: a graph's semantics (static inputs, static outputs) without CUDA. So the tests exercise
kiln's real lazy machinery (the thread, the private capture inputs, publication, dispatch) and
check: the order (smallest first, or the given order); a call while a capture is held mid-way
returns without waiting; outputs equal eager capture's during and after; every size is captured
eventually and the summary says when; a capture that raises is reported and leaves its size
running without graphs; close() stops the thread. Real graphs: tests/cuda/test_lazy_capture.py.
"""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from examples.toy_llama import build
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import building_with
from kiln.workers.runtime.kiln_model import KilnModel
from tests.orchestrator.conftest import TINY

SIZES = [1, 2, 4, 8]
MODEL = {**TINY, "max_seqs": 16}


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


class FakeGraph:
    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        _copy_into(self.out, self.fn())
        self.replays += 1


class FakePool:
    """GraphPool.capture without CUDA; `hold(kind, size)` runs inside each capture (tests block it)."""

    def __init__(self, hold=None, fail=()):
        self.captures: list[tuple[str, int, str]] = []
        self.stats: list = []
        self.hold, self.fail = hold, set(fail)

    def capture(self, kind, size, fn):
        self.captures.append((kind, size, threading.current_thread().name))
        if self.hold is not None:
            self.hold(kind, size)
        if size in self.fail:
            raise RuntimeError(f"injected capture failure at size {size}")
        out = fn()
        self.stats.append(SimpleNamespace(kind=kind, size=size, seconds=0.0, bytes=0, at=time.time()))
        return FakeGraph(fn, out), out

    def sizes(self, kind=None) -> list[int]:
        seen: list[int] = []
        for k, size, _ in self.captures:
            if (kind is None or k == kind) and size not in seen:
                seen.append(size)
        return seen


def make(mode: str, capture: str, pool: FakePool, **fields) -> KilnModel:
    config = CompilationConfig(cudagraph_mode=mode, use_inductor=False, cudagraph_copy_inputs=True,
                               cudagraph_capture=capture, **fields)
    with building_with(config):
        model = build(**MODEL)
    kiln = KilnModel(model, config, graph_pool=pool)
    torch._dynamo.reset()  # every model here traces the same forward: stay under Dynamo's cache limit
    kiln.compile(SIZES)
    return kiln


def batch(n: int, decode: bool):
    if decode:  # one new token for each of n sequences
        return torch.arange(n) % 60, torch.full((n,), 2), torch.arange(n)
    return torch.arange(n) % 60, torch.arange(n), torch.zeros(n, dtype=torch.long)


def run(kiln: KilnModel, n: int, decode: bool) -> torch.Tensor:
    kiln.model.reset_cache()
    with torch.no_grad():
        kiln(*kiln.place(*batch(8, False)), decode=False)  # some history in the cache
        return kiln(*kiln.place(*batch(n, decode)), decode=decode).clone()


CASES = [(n, d) for n in (1, 3, 4, 8, 11) for d in (True, False)]  # captured, padded, above the largest


@pytest.fixture(scope="module")
def eager_capture():
    pool = FakePool()
    kiln = make("FULL_AND_PIECEWISE", "eager", pool)
    return kiln, pool, {case: run(kiln, *case) for case in CASES}


def test_eager_capture_largest_first_on_fake_pool(eager_capture):
    _, pool, _ = eager_capture
    assert pool.sizes("full") == [8, 4, 2, 1]
    assert pool.sizes("piecewise") == [8, 4, 2, 1]


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "PIECEWISE"])
def test_lazy_equals_eager_during_and_after(mode, eager_capture):
    release = threading.Event()
    held = threading.Event()

    def hold(kind, size):
        if size == 4:  # hold the capture thread in the middle of size 4 (1 and 2 are done)
            held.set()
            assert release.wait(30)

    pool = FakePool(hold=hold)
    kiln = make(mode, "lazy", pool)
    _, _, expected = eager_capture
    if mode == "PIECEWISE":
        ref_pool = FakePool()
        ref = make(mode, "eager", ref_pool)
        expected = {case: run(ref, *case) for case in CASES}
    try:
        assert held.wait(30), "the capture thread never reached size 4"
        assert kiln.lazy.running
        during = {}
        for case in CASES:  # while size 4 is held: 1 (captured), 3 and 4 (not yet), 8, 11
            t0 = time.perf_counter()
            during[case] = run(kiln, *case)
            assert time.perf_counter() - t0 < 10, "a call waited for the held capture"
        assert not release.is_set() and kiln.lazy.running  # the calls returned while it was held
        assert 4 not in kiln._piecewise_graphed and 4 not in kiln.full_graphs
        assert 1 in kiln._piecewise_graphed or mode == "FULL_AND_PIECEWISE" and 1 in kiln.full_graphs
    finally:
        release.set()
    assert kiln.lazy.wait(60)
    after = {case: run(kiln, *case) for case in CASES}
    for case in CASES:
        torch.testing.assert_close(during[case], expected[case], rtol=1e-5, atol=1e-5, msg=f"during {case}")
        torch.testing.assert_close(after[case], expected[case], rtol=0, atol=0, msg=f"after {case}")
    # Every size eventually, smallest first, all on the capture thread.
    assert pool.sizes() == SIZES
    assert {name for _, _, name in pool.captures} == {"kiln-lazy-capture"}
    assert kiln._piecewise_graphed == frozenset(SIZES)
    if mode == "FULL_AND_PIECEWISE":
        assert sorted(kiln.full_graphs) == SIZES
        replays = sum(graph.replays for graph, _ in kiln.full_graphs.values())
        assert replays > 0, "decode batches after the capture did not replay the full graphs"
    summary = kiln.capture_summary()
    assert summary["capture"] == "lazy" and summary["captured"] == len(SIZES) and summary["done"]
    assert [e["size"] for e in summary["per_size"]] == SIZES
    assert all(e["state"] == "captured" and e["after_ready_s"] >= 0 and e["seconds"] >= 0
               for e in summary["per_size"])
    assert summary["per_size"][2]["after_ready_s"] >= summary["per_size"][1]["after_ready_s"]
    assert kiln.close(5)


def test_ready_before_captures_and_given_order():
    release = threading.Event()
    pool = FakePool(hold=lambda kind, size: release.wait(30))
    t0 = time.perf_counter()
    kiln = make("FULL", "lazy", pool, cudagraph_capture_order=[4])
    try:  # compile() returned while the very first capture is held
        assert not kiln.full_graphs and kiln.lazy.running
        assert "lazy capture in the background" in kiln.cudagraph_status
        phase = next(p for p in kiln.record.phases if p.kind == "capture")
        assert phase.seconds == 0.0 and phase.extra["timing"] == "lazy" and phase.extra["order"] == [4, 1, 2, 8]
        out = run(kiln, 3, True)  # padded size 4 is not captured: runs without graphs
        assert out.shape == (3, MODEL["vocab"])
    finally:
        release.set()
    assert kiln.lazy.wait(60)
    assert pool.sizes("full") == [4, 1, 2, 8]
    assert time.perf_counter() - t0 < 120
    kiln.close()


def test_capture_error_is_reported_and_size_stays_ungraphed(eager_capture):
    pool = FakePool(fail=[2])
    kiln = make("FULL_AND_PIECEWISE", "lazy", pool)
    assert kiln.lazy.wait(60)
    summary = kiln.capture_summary()
    assert summary["captured"] == 3 and set(summary["failed"]) == {2}
    assert "injected capture failure at size 2" in summary["failed"][2]
    assert any("lazy capture of size 2 failed" in w for w in kiln.record.warnings)
    assert 2 not in kiln._piecewise_graphed and 2 not in kiln.full_graphs
    assert all(2 not in g.graphs for g in kiln._piecewise)  # partial pieces dropped
    assert sorted(kiln.full_graphs) == [1, 4, 8]
    _, _, expected = eager_capture
    for n in (2, 4):
        for decode in (True, False):
            torch.testing.assert_close(run(kiln, n, decode), expected[(n, decode)] if n != 2 else
                                       run_plain(n, decode), rtol=1e-5, atol=1e-5)
    kiln.close()


def run_plain(n: int, decode: bool) -> torch.Tensor:
    config = CompilationConfig(cudagraph_mode="NONE", level=0)
    with building_with(config):
        model = build(**MODEL)
    model.reset_cache()
    with torch.no_grad():
        model(*batch(8, False))
        return model(*batch(n, decode))


def test_close_stops_the_thread_between_sizes():
    entered = threading.Event()
    release = threading.Event()

    def hold(kind, size):
        entered.set()
        release.wait(30)

    pool = FakePool(hold=hold)
    kiln = make("FULL", "lazy", pool)
    assert entered.wait(30)
    closer = threading.Thread(target=kiln.close, args=(30,))
    closer.start()  # close() waits for the size being captured, then the thread stops
    time.sleep(0.05)
    release.set()
    closer.join(30)
    assert not kiln.lazy.running
    summary = kiln.capture_summary()
    assert summary["captured"] == 1 and pool.sizes() == [1]
    assert [e["state"] for e in summary["per_size"]] == ["captured", "skipped", "skipped", "skipped"]
    assert run(kiln, 4, True).shape == (4, MODEL["vocab"])  # uncaptured sizes still run


def test_dropping_the_model_stops_its_thread():
    release = threading.Event()
    pool = FakePool(hold=lambda kind, size: release.wait(30))
    kiln = make("FULL", "lazy", pool)
    lazy = kiln.lazy
    del kiln
    gc.collect()
    release.set()
    assert lazy.wait(30) and not lazy._thread.join(30) and not lazy.running
    assert lazy.summary()["captured"] <= 1  # the held size may finish; nothing after it


def test_lazy_with_tensor_parallelism_captures_eagerly(monkeypatch):
    from kiln.workers.runtime import kiln_model

    monkeypatch.setattr(kiln_model, "tp_world_size", lambda: 2)
    pool = FakePool()
    kiln = make("FULL", "lazy", pool)
    assert kiln.lazy is None and sorted(kiln.full_graphs) == SIZES
    assert any("captured eagerly" in w for w in kiln.record.warnings)


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def test_full_graph_inputs_are_not_the_piecewise_graphs_inputs():
    """FULL_AND_PIECEWISE: once a size's piecewise graphs are published, a mixed batch on the
    main thread copies real rows into their private inputs while the capture thread still runs
    the full graph's warm-ups and capture; those must run on inputs of their own (padding rows
    only), or they write real KV-cache slots behind the main thread's back. Here the capture
    thread is held just before the full capture of size 4 (its piecewise graphs published) while
    the main thread runs a mixed batch of 3 (padded to 4, on those piecewise graphs)."""
    held, release = threading.Event(), threading.Event()

    def hold(kind, size):
        if (kind, size) == ("full", 4):
            held.set()
            assert release.wait(30)

    pool = FakePool(hold=hold)
    kiln = make("FULL_AND_PIECEWISE", "lazy", pool)
    try:
        assert held.wait(30)
        assert 4 in kiln._piecewise_graphed and 4 not in kiln.full_graphs
        run(kiln, 3, False)  # piecewise graphs of size 4: real rows into their inputs
    finally:
        release.set()
    assert kiln.lazy.wait(60)
    pad = kiln.dummy_inputs(4)
    for size in SIZES:
        full = _storages(kiln._full_inputs[size])
        pieces = set().union(*(_storages(g.graphs[size].inputs) for g in kiln._piecewise))
        assert full and not full & pieces, f"size {size}: the full graph shares inputs with the piecewise graphs"
    # No decode batch has replayed a full graph yet: its inputs still hold padding only.
    for got, want in zip(kiln._full_inputs[4], pad):
        assert torch.equal(got, want), "the full capture of size 4 ran on the main thread's rows"
    kiln.close()


def test_gc_is_paused_during_a_capture_and_restored():
    from kiln.workers.runtime.cudagraphs import _gc_paused

    assert gc.isenabled()
    with _gc_paused():
        assert not gc.isenabled()
        with _gc_paused():  # nested (another thread's capture) keeps it off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with _gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # was off before: stays off
    finally:
        gc.enable()
    entered, leave = threading.Event(), threading.Event()

    def other():
        with _gc_paused():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(10)
    with _gc_paused():
        pass
    assert not gc.isenabled()  # the other thread is still inside
    leave.set()
    thread.join(10)
    assert gc.isenabled()
