"""CUDA graph capture and replay: piecewise graphs per piece and size, full graphs per size.

Runtime mode: a forward runs with piecewise graphs on (PIECEWISE) or off (NONE); the runner
sets it per call (`graph_runtime`). Full graphs capture the whole compiled forward while the
piecewise graphs are off. All graphs of a worker share one memory pool; eager capture takes
the sizes largest first, so smaller graphs reuse the larger ones' memory. Lazy capture
(`GraphPool(stream=...)`, KilnModel._capture_size_lazily) takes them in order of expected use on
a background thread's own stream, with capture_error_mode "thread_local".

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
    capture stream is synchronised, before (its warm-up work is done) and after.
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
        with torch.cuda.graph(graph, pool=self.handle):
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
        with torch.cuda.stream(stream):
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
