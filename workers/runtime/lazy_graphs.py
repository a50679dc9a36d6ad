"""What lazy capture does to a KilnModel: set up its side streams and pool, capture one size.

`LazyGraphs` is a base of `KilnModel` (workers/runtime/kiln_model.py), kept in its own file
because the argument for why capturing next to a serving thread is sound is long; the thread
that calls `_capture_size_lazily` size after size is `LazyCapture` (lazy_capture.py). The
attributes used here (`_buffers`, `_piecewise`, `_piecewise_graphed`, `full_graphs`,
`_full_inputs`, `pool`, `forward_fn`, `record`, ...) are KilnModel's, set up by its
`_prepare_capture`.
"""

from __future__ import annotations

import contextlib
import time

import torch

from kiln.workers.compilation.record import Phase
from kiln.workers.runtime.cudagraphs import GraphPool, graph_runtime
from kiln.workers.runtime.lazy_capture import LazyCapture


class LazyGraphs:
    """KilnModel's lazy-capture half (see the module docstring)."""

    def _start_lazy_capture(self) -> None:
        """Set everything up that dispatch needs, then start the capture thread and return."""
        config = self.config
        device = self._buffers_device()
        cuda = device.type == "cuda"
        # Two side streams: eager work (warm-ups, the splitting ops between piecewise captures)
        # on `work`, captures on `capture`, which never runs anything eagerly. See "cuBLAS
        # workspace" in _capture_size_lazily for why they must differ.
        work = torch.cuda.Stream(device) if cuda else None
        capture = torch.cuda.Stream(device) if cuda else None
        pool = self._injected_pool if self._injected_pool is not None else GraphPool(stream=capture)
        piecewise, full = self._prepare_capture(pool)
        if cuda:
            # The side streams do not synchronise with the main thread's: order everything
            # queued on it so far (weights and KV cache being filled or copied in, the trace's
            # first run, the static buffers just cloned) before the capture thread's first
            # kernel, which reads the weights and writes the KV cache.
            work.wait_stream(torch.cuda.current_stream(device))
            capture.wait_stream(torch.cuda.current_stream(device))
        self._lazy_plan = (piecewise, full, work, capture)
        order = config.lazy_capture_order()
        ready_at = time.time()
        self.lazy = LazyCapture(order, self._capture_size_lazily, ready_at=ready_at,
                                on_error=self._lazy_capture_failed)
        self.record.phases.append(Phase("capture (lazy, background)", "capture", ready_at, ready_at, 0.0, {
            "timing": "lazy", "sizes": len(order), "order": order, "mode": self.mode.name}))
        self.cudagraph_status = (f"cudagraphs: {self.mode.name}, {len(order)} sizes, lazy capture in the "
                                 "background")
        self.lazy.start()

    def _lazy_capture_failed(self, size: int, error: str) -> None:
        self.record.warnings.append(f"lazy capture of size {size} failed, it runs without CUDA graphs: {error}")
        if size not in self._piecewise_graphed:  # drop the pieces captured before the failure
            for graphs in self._piecewise:
                graphs.graphs.pop(size, None)

    def _capture_size_lazily(self, size: int) -> None:
        """Capture one size on the capture thread, then publish it (runs in LazyCapture's thread).

        Why this is sound next to a main thread that serves batches at the same time:
        - Streams. Everything here runs on the thread's own side streams (non-blocking streams,
          so launches on the main thread's stream, even the legacy default one, never
          synchronise with them); captures use capture_error_mode "thread_local" (GraphPool), so
          the main thread's cudaMalloc, syncs and launches neither fail nor invalidate a
          capture. The current stream and grad mode are per thread in torch.
        - cuBLAS workspace. ATen gives each (cuBLAS handle, stream) pair its own workspace, and
          a GEMM captured in a graph keeps that workspace's address: every replay on the main
          stream uses the workspace of the *capture* stream. Had this thread's eager work
          (warm-ups of the next size, the splitting ops between piecewise captures) run on the
          capture stream, its GEMMs would share that workspace with replays running on the
          main stream at the same moment: wrong rows in a published size (seen on an H200
          with FULL_AND_PIECEWISE, 2 runs in 3, when both ran on one side stream). So eager
          work runs on `work`, and `capture` only ever captures; replays of graphs captured on
          it run one after another on the main stream, as in eager capture.
        - Inputs. The warm-ups and the capture run on inputs of their own, padding rows made
          here (`dummy_inputs`), never on kiln's static buffers `_buffers`, which the main
          thread writes real batches into. A graph therefore reads these private tensors: a
          full graph's replay first copies the staged rows from `_buffers` into them
          (`_full_inputs`, a few small copies per replay); a piecewise graph copies any input
          whose address differs from its capture's (PiecewiseGraphs does that already).
          The piecewise graphs and the full graph of one size get *separate* private inputs:
          once the piecewise graphs are published, a mixed batch on the main thread copies its
          real rows into their inputs (on the main stream) while this thread is still running
          the full graph's warm-ups on the side stream. Had those warm-ups read the same
          tensors (as they did), they would run the model on real ids, positions and KV slots,
          half-copied or stale, and write their k/v into *real* KV-cache slots at real
          positions, unordered with the main stream's reads: wrong outputs for later batches
          (FULL_AND_PIECEWISE only). Nothing this thread reads may be a tensor that a
          published graph's replay writes.
        - Stream order. `_start_lazy_capture` makes the side stream wait for the main stream
          once, so the weights, KV cache and everything else queued before the thread starts are
          in place before its first kernel. After that the side stream reads only tensors the
          main stream never writes again (weights) or whose rows it shares only as garbage (the
          spare KV slot); the main stream uses the side stream's results only after a host
          synchronisation (Publication).
        - KV cache. Padding rows carry the model's pad_values (the spare KV slot), so the
          attention that runs eagerly between piecewise captures, and the warm-ups, write only
          the spare slot, which no real row reads; the main thread's padding rows write it too,
          both garbage, neither ever read.
        - Memory pool. All graphs share one pool, as in eager capture, captured in
          lazy_capture_order (smallest first by default) instead of largest first. Only the
          capture stream allocates from the pool (torch routes a pool's allocations by the
          capturing stream), a capture launches nothing (so it never writes pool memory that a
          replay on the main stream is using), the eager ops run during a piecewise capture
          only read pool memory (garbage, like in eager capture) and write their own, and all
          replays run on the main thread's stream one after another (GraphPool's docstring
          has the longer argument). Automatic garbage collection is paused during each
          capture (GraphPool), since freeing an earlier model's graph on this thread would
          invalidate it. What shrinks is reuse:
          a small size captured first cannot hand a larger one all of its memory, so the pool
          can end larger than eager capture's (the capture stats and the report give the bytes).
        - Publication. A size becomes visible to dispatch only when all its graphs are captured
          and the capture stream is synchronised (the eager attention of a piecewise capture
          writes tensors that later graphs copy into): piecewise by replacing the frozenset
          `_piecewise_graphed`, full by assigning `full_graphs[size]` after its inputs. Each is
          one reference store, atomic for the main thread (which never sees half a size).
        - Threads. Only the capture thread ever captures; compiled pieces are re-entrant
          (Inductor's code allocates its outputs per call; kiln's runtime state is a
          threading.local). The GIL is shared, so the main thread's Python runs interleaved with
          this thread's, which slows it a little while capturing but never blocks it on a
          capture. Not for free-threaded Python builds.
        """
        piecewise, full, stream, capture_stream = self._lazy_plan
        cuda = stream is not None
        warmups = self.config.cudagraph_num_of_warmups

        def synchronize() -> None:  # both side streams: work done, graphs complete
            stream.synchronize()
            capture_stream.synchronize()

        with torch.no_grad(), (torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
            inputs = self.dummy_inputs(size)  # private, padding rows only
            if piecewise:
                for _ in range(warmups):
                    with graph_runtime(True, size):
                        self.forward_fn(*inputs)
                with graph_runtime(True, size, capturing=True):
                    self.forward_fn(*inputs)
                if cuda:
                    synchronize()
                self._piecewise_graphed = self._piecewise_graphed | {size}
            if full:
                # Not the piecewise graphs' inputs: those are published and the main thread may
                # be copying a real batch into them now (see Inputs above).
                full_inputs = self.dummy_inputs(size) if piecewise else inputs
                for _ in range(warmups):
                    self.forward_fn(*full_inputs)
                forward = self.forward_fn  # (the graph's closure must not hold the KilnModel)
                entry = self.pool.capture("full", size, lambda: forward(*full_inputs))
                if cuda:
                    synchronize()
                self._full_inputs[size] = full_inputs
                self.full_graphs[size] = entry
