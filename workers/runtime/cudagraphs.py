"""CUDA graph capture and replay: piecewise graphs per piece and size, full graphs per size.

Runtime mode: a forward runs with piecewise graphs on (PIECEWISE) or off (NONE); the runner
sets it per call (`graph_runtime`). Full graphs capture the whole compiled forward while the
piecewise graphs are off. All graphs of a worker share one memory pool; eager capture takes
the sizes largest first, so smaller graphs reuse the larger ones' memory. Lazy capture
(`GraphPool(stream=...)`, LazyGraphs._capture_size_lazily) takes them in order of expected use on
a background thread's own stream, with capture_error_mode "thread_local".

Garbage collection is paused while a capture is under way (`_gc_paused`): a cyclic collection
that runs on the capturing thread in the middle of a capture can destroy an unreachable
CUDAGraph of an earlier model (PiecewiseGraphs and its runner form a cycle, so graphs are freed
by the collector, not by reference counts) or unload a module; cudaGraphExecDestroy and the like
are prohibited on a capturing thread, the CUDA call fails ("operation not permitted when stream
is capturing") and the capture is invalidated (pytorch/pytorch#161037). torch.cuda.graph used to
run gc.collect() before every capture, which hid this; it no longer does, and a lazy capture
thread runs next to a main thread that keeps making garbage.

Static inputs: a piecewise graph remembers the tensors it was captured with (keeping them
alive) and, on replay, copies any input whose address changed into them (the output of an
eager attention op between two graphs, say); weights never move, so they are never copied.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch

from kiln.workers.compilation.piece_runner import PieceRunner


@dataclass
class _Runtime(threading.local):
    piecewise: bool = False
    """Piecewise graphs on for the current forward."""
    size: int = 0
    """The padded batch size of the current forward."""
    capturing: bool = False
    """Capture piecewise graphs that do not exist yet (during warm-up)."""


_RT = _Runtime()


@contextlib.contextmanager
def graph_runtime(piecewise: bool, size: int, capturing: bool = False) -> Iterator[None]:
    saved = (_RT.piecewise, _RT.size, _RT.capturing)
    _RT.piecewise, _RT.size, _RT.capturing = piecewise, size, capturing
    try:
        yield
    finally:
        _RT.piecewise, _RT.size, _RT.capturing = saved


_GC_LOCK = threading.Lock()
_GC_DEPTH = 0
_GC_WAS_ENABLED = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (the whole process: gc is global). Nestable and
    thread-safe: the collector's state from before the outermost entry is restored when the
    last one leaves, so two threads capturing at once (eager capture of one model while another
    model's lazy thread captures) never re-enable it under each other. Explicit gc.collect()
    still works; the window is one capture (begin to end), a few milliseconds."""
    global _GC_DEPTH, _GC_WAS_ENABLED
    with _GC_LOCK:
        if _GC_DEPTH == 0:
            _GC_WAS_ENABLED = gc.isenabled()
            gc.disable()
        _GC_DEPTH += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _GC_DEPTH -= 1
            if _GC_DEPTH == 0 and _GC_WAS_ENABLED:
                gc.enable()


@dataclass
class CaptureStat:
    kind: str  # "piecewise" or "full"
    size: int
    seconds: float
    bytes: int
    """Growth of memory reserved by the allocator during the capture (pool included). With lazy
    capture the main thread allocates at the same time, so the figure is approximate."""
    at: float = 0.0
    """Wall-clock end of the capture (seconds since the epoch)."""


@dataclass
class GraphPool:
    """The one memory pool and the capture statistics of a worker.

    Eager capture (`stream` None): torch.cuda.graph on its default side stream, device syncs
    around each capture, and capture_error_mode "global": nothing else runs meanwhile.

    Lazy capture (`stream` set, used by the capture thread only): the capture begins and ends on
    that stream with capture_error_mode "thread_local", so the main thread's CUDA calls
    (cudaMalloc by its allocator, syncs, launches on its own stream) neither fail nor invalidate
    the capture; only the capture thread is barred from unsafe calls while it captures. It goes
    around torch.cuda.graph's __enter__ on purpose: that runs a device-wide synchronize,
    gc.collect() and empty_cache() before every capture, which from a background thread would
    hold the GIL and return cached blocks that the serving thread is about to reuse. Only the
    capture stream is synchronised, before (its warm-up work is done) and after. Automatic
    garbage collection is paused from capture_begin to capture_end (`_gc_paused`, see the module
    docstring): the collector would otherwise run on this thread whenever its allocations cross
    the threshold, and freeing another graph there invalidates the capture.

    Why one pool shared by lazily captured graphs is sound while the main stream replays other
    graphs of it (torch's private-pool semantics, torch/cuda/graphs.py and the caching
    allocator): during a capture only allocations on a stream that is capturing *this* graph
    are routed to the pool, so the main thread's allocations never come from it; a capture
    launches no kernels, so the memory it is handed (blocks freed by earlier captures, i.e. other
    graphs' intermediates, which the main stream may be writing at that moment) is not written
    until this graph is replayed, and every replay runs on the main thread's stream, one after
    another, as in eager capture; blocks still referenced (every graph's static output) are never
    handed out again. Outside a capture the capture thread's eager work (warm-ups, the splitting
    ops between piecewise captures) allocates from the ordinary per-stream caches, and writes pool
    memory nowhere: it only reads the static outputs of the pieces it just captured (garbage, as
    in eager capture) and writes its own tensors and the spare KV slot. So no private pool per
    size is needed; a splitting op that wrote *in place* into a piece's output would break this.
    """

    handle: Any = field(default_factory=lambda: torch.cuda.graph_pool_handle())
    stats: list[CaptureStat] = field(default_factory=list)
    stream: Any = None
    """The lazy capture thread's side stream (None: eager capture)."""

    def capture(self, kind: str, size: int, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        if self.stream is not None:
            return self._capture_on_stream(kind, size, fn)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        t0 = time.perf_counter()
        with _gc_paused(), torch.cuda.graph(graph, pool=self.handle):
            out = fn()
        torch.cuda.synchronize()
        self.stats.append(CaptureStat(kind, size, time.perf_counter() - t0,
                                      torch.cuda.memory_reserved() - before, time.time()))
        return graph, out

    def _capture_on_stream(self, kind: str, size: int, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        graph = torch.cuda.CUDAGraph()
        stream = self.stream
        stream.synchronize()
        before = torch.cuda.memory_reserved()
        t0 = time.perf_counter()
        with torch.cuda.stream(stream), _gc_paused():
            graph.capture_begin(self.handle, capture_error_mode="thread_local")
            try:
                out = fn()
            except BaseException:
                try:  # end the capture (it is invalid anyway) so the stream is usable again
                    graph.capture_end()
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    pass
                raise
            graph.capture_end()
        stream.synchronize()
        self.stats.append(CaptureStat(kind, size, time.perf_counter() - t0,
                                      torch.cuda.memory_reserved() - before, time.time()))
        return graph, out


@contextlib.contextmanager
def fast_capture() -> Iterator[None]:
    """Collect garbage once, then freeze it: torch.cuda.graph otherwise runs gc.collect() and
    empty_cache() at every capture, which dominates the capture time of many small graphs."""
    gc.collect()
    gc.freeze()
    try:
        with mock.patch("gc.collect", lambda *a, **k: 0), mock.patch("torch.cuda.empty_cache", lambda: None):
            yield
    finally:
        gc.unfreeze()


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]
    ptrs: list[int | None]
    output: Any


class PiecewiseGraphs:
    """Interposes on a compiled piece's call: capture per size, then replay."""

    def __init__(self, runner: PieceRunner, pool: GraphPool):
        assert not runner.is_splitting
        self.runner = runner
        self.pool = pool
        self.graphs: dict[int, _Captured] = {}
        runner.call = self

    def __call__(self, *args: Any) -> Any:
        if not _RT.piecewise:
            return self.runner.run(*args)
        entry = self.graphs.get(_RT.size)
        if entry is None:
            if not _RT.capturing:
                return self.runner.run(*args)
            graph, out = self.pool.capture("piecewise", _RT.size, lambda: self.runner.run(*args))
            ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else None for a in args]
            self.graphs[_RT.size] = _Captured(graph, list(args), ptrs, out)
            return out
        for i, arg in enumerate(args):
            ptr = entry.ptrs[i]
            if ptr is not None and arg.data_ptr() != ptr:
                entry.inputs[i].copy_(arg)
        entry.graph.replay()
        return entry.output
