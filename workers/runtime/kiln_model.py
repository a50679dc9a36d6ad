"""`KilnModel`: a model compiled at the configured level, with CUDA graphs and padding.

The batch contract (what kiln needs from a model beyond its forward):
- every forward input is a tensor whose dim 0 is the batch (N tokens);
- `model.example_inputs(n)` returns inputs for a batch of n (shapes and dtypes only matter);
- optional `model.pad_values()`: per input, the fill value of padding rows (default 0); the
  example model routes padding rows to a spare KV-cache slot so they never touch real data;
- optional `model.is_decode_batch(*inputs)`: the model's definition of a decode batch, used
  when the caller does not say `decode=` (costs a device sync).

Dispatch for a batch of b: with graphs, b ≤ max capture size runs the graphs of the padded
size p = bs_to_padded_graph_size[b] on kiln's static input buffers (rows b..p are padding) and
returns rows 0..b of the output; larger batches run without graphs. The returned tensors of a
graph replay are kiln's static outputs: valid until the next call (clone to keep them).

Lazy capture (`cudagraph_capture="lazy"`): compile() returns once the pieces are compiled or
loaded, and a background thread (workers/runtime/lazy_capture.py) captures the sizes in
`config.lazy_capture_order()`. Dispatch is the same as above for a size already captured; a
batch whose padded size is not captured yet runs the compiled pieces without graphs, unpadded,
on the caller's inputs (so it never waits). Whether a batch goes through kiln's static buffers
(`uses_graphs`, `place`, `input_buffers`) does not depend on how far the capture has got: the
caller's contract is the same before, during and after. See `_capture_size_lazily`
(lazy_graphs.py) for why capturing next to a serving thread is sound.

Static input buffers: with `cudagraph_copy_inputs` kiln copies the inputs into its buffers.
Without it the caller writes batches into `input_buffers(b)` (views of kiln's buffers) and
passes those views; kiln checks the addresses and refuses anything else. `place(*inputs)` does
that copy for callers that hold their batches elsewhere (the Ray worker's run()). Either way an
input must match its buffer's trailing shape, dtype and device: a mismatch is an error, never a
silent broadcast or cast.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import torch

from kiln.workers import torch_internals
from kiln.workers.config.modes import CompilationLevel, CUDAGraphMode
from kiln.workers.config import DEFAULT_CAPTURE_SIZES, CompilationConfig
from kiln.workers.runtime.cudagraphs import GraphPool, PiecewiseGraphs, fast_capture, graph_runtime
from kiln.workers.compilation.record import CompileRecord, Phase
from kiln.workers.layers.parallel_state import tp_world_size
from kiln.workers.runtime.lazy_capture import LazyCapture
from kiln.workers.runtime.lazy_graphs import LazyGraphs

log = logging.getLogger("kiln.runner")

CUDAGRAPHS_UNAVAILABLE = "cudagraphs: unavailable (no CUDA)"
_warned_no_cuda = False


class KilnModel(LazyGraphs):
    def __init__(
        self,
        model: torch.nn.Module,
        config: CompilationConfig,
        *,
        store: Any = None,
        rank: int = 0,
        record: CompileRecord | None = None,
        graph_pool: Any = None,
    ):
        """`graph_pool`: a GraphPool, or a stand-in with its `capture(kind, size, fn)` and
        `stats` (tests on the CPU inject a fake one, since CUDA graphs need CUDA); given one,
        the configured cudagraph_mode is used on any device."""
        self.model = model
        self.config = config
        self.store = store
        self.rank = rank
        self.record = record if record is not None else CompileRecord()
        self.forward_fn: Any = None
        self.backend: Any = None
        self.pool: GraphPool | None = None
        self.full_graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.mode = CUDAGraphMode.NONE
        self.cudagraph_status = "off"
        self._buffers: list[torch.Tensor] = []
        self._pad = self._pad_values()
        self._injected_pool = graph_pool
        self._piecewise: list[PiecewiseGraphs] = []
        self._piecewise_graphed: frozenset[int] = frozenset()
        """Sizes whose piecewise graphs are all captured (replaced whole, never mutated)."""
        self._full_inputs: dict[int, tuple[torch.Tensor, ...]] = {}
        """Lazy capture: the private input tensors each full graph was captured on."""
        self.lazy: LazyCapture | None = None

    # ---- set-up -------------------------------------------------------------------------------

    def _pad_values(self) -> tuple[int, ...]:
        n = len(self.model.example_inputs(1))
        pad = getattr(self.model, "pad_values", None)
        values = tuple(pad()) if pad is not None else (0,) * n
        assert len(values) == n, f"pad_values() gave {len(values)} values for {n} inputs"
        return values

    def dummy_inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        """A batch of n padding rows: what tracing and capture run on, touching no real data."""
        return tuple(t.new_full(t.shape, v) for t, v in zip(self.model.example_inputs(n), self._pad))

    def _resolve_mode(self, device: torch.device) -> CUDAGraphMode:
        global _warned_no_cuda
        mode = self.config.cudagraph_mode or CUDAGraphMode.NONE
        if mode == CUDAGraphMode.NONE:
            return mode
        if device.type != "cuda" and self._injected_pool is None:
            if not _warned_no_cuda:
                warnings.warn(f"cudagraph_mode {mode.name} needs CUDA; running without CUDA graphs "
                              f"({CUDAGRAPHS_UNAVAILABLE})", stacklevel=3)
                _warned_no_cuda = True
            self.cudagraph_status = CUDAGRAPHS_UNAVAILABLE
            self.record.warnings.append(CUDAGRAPHS_UNAVAILABLE)
            return CUDAGraphMode.NONE
        if mode.requires_piecewise_compilation() and self.config.level != CompilationLevel.PIECEWISE:
            raise ValueError(f"cudagraph_mode {mode.name} needs level 3 (piecewise); level is "
                             f"{int(self.config.level)}")
        return mode

    def compile(self, sizes: list[int] | None = None) -> CompileRecord:
        """Trace, compile (or load) and, on CUDA, capture for `sizes` (default capture sizes).

        Counts Inductor's autotuning benchmarks throughout (record.autotune_benchmarks): the
        runtime autotuner runs at a kernel's first launch, so in the first run and the warm-up
        runs before capture, not only while compiling."""
        if self.config.level == CompilationLevel.NO_COMPILATION:
            return self._compile(sizes)
        # Dynamo's and Inductor's modules take seconds to import; a phase of their own, so that
        # the report does not put them in the first trace or the first load.
        with self.record.phase("import_compiler", "setup"):
            torch_internals.import_compiler()
        with torch_internals.count_autotune_benchmarks() as tuned:
            try:
                return self._compile(sizes)
            finally:
                self.record.autotune_benchmarks += tuned.calls

    def _compile(self, sizes: list[int] | None) -> CompileRecord:
        from kiln.workers.compilation.backend import compile_forward

        config, record = self.config, self.record
        config.init_with_cudagraph_sizes(sizes or DEFAULT_CAPTURE_SIZES)
        device = self.dummy_inputs(1)[0].device
        self.mode = self._resolve_mode(device)
        self.forward_fn, self.backend = compile_forward(
            self.model, config, store=self.store, rank=self.rank, record=record)
        # Trace with a batch of at least 2: Dynamo specializes sizes 0 and 1.
        trace_size = max(2, config.max_capture_size)
        t0 = time.time()
        with torch.no_grad():
            self.forward_fn(*self.dummy_inputs(trace_size))
        times = getattr(self.forward_fn, "times", None)
        cache = getattr(self.forward_fn, "cache", None)
        if cache is not None:
            record.trace_cache = cache.status
        if times is not None and times.backend_start:
            name = "trace_replay" if times.replayed else "dynamo_trace"
            record.phases.insert(0, _phase(name, "trace", times.dynamo_start, times.backend_start))
            if self.backend is None:  # level 2: the backend is one opaque compile
                record.phases.append(_phase("compile", "compile", times.backend_start, times.backend_end))
            record.phases.append(_phase("first_run", "run", times.backend_end, time.time()))
        else:
            record.phases.append(_phase("compile", "compile", t0, time.time()) if config.level
                                 else _phase("eager_run", "run", t0, time.time()))
        if self.mode != CUDAGraphMode.NONE:
            lazy = config.cudagraph_capture == "lazy"
            if lazy and config.level == CompilationLevel.DYNAMO_AS_IS:
                note = ("cudagraph_capture lazy: captured eagerly at level 1, where torch.compile may "
                        "recompile on a call, and Dynamo does not compile in two threads at once")
                log.warning(note)
                record.warnings.append(note)
                self._capture()
            elif lazy and tp_world_size() > 1:
                note = ("cudagraph_capture lazy: captured eagerly, since with tensor parallelism the "
                        "capture thread's collectives would interleave with the main thread's in an "
                        "order that differs across ranks")
                log.warning(note)
                record.warnings.append(note)
                self._capture()
            elif lazy:
                self._start_lazy_capture()
            else:
                self._capture()
        return record

    def _prepare_capture(self, pool: Any) -> tuple[bool, bool]:
        """Static buffers, the pool, the piecewise wrappers; (piecewise, full) for the mode."""
        self._buffers = [t.clone() for t in self.dummy_inputs(self.config.max_capture_size)]
        self.pool = pool
        piecewise = self.mode.mixed_mode() == CUDAGraphMode.PIECEWISE
        full = self.mode.has_full_cudagraphs()
        if piecewise:
            self._piecewise = [PiecewiseGraphs(runner, self.pool)
                               for runner in self.backend.runners if not runner.is_splitting]
        return piecewise, full

    def _capture(self) -> None:
        config, record = self.config, self.record
        sizes = list(config.cudagraph_capture_sizes or [])  # largest first
        cuda = self._buffers_device().type == "cuda"
        piecewise, full = self._prepare_capture(self._injected_pool or GraphPool())
        with record.phase("capture", "capture") as facts, torch.no_grad(), fast_capture():
            free_before = torch.cuda.mem_get_info()[0] if cuda else 0
            for size in sizes:
                inputs = [b[:size] for b in self._buffers]
                if piecewise:
                    for _ in range(config.cudagraph_num_of_warmups):
                        with graph_runtime(True, size):
                            self.forward_fn(*inputs)
                    with graph_runtime(True, size, capturing=True):
                        self.forward_fn(*inputs)
                if full:
                    for _ in range(config.cudagraph_num_of_warmups):
                        self.forward_fn(*inputs)
                    self.full_graphs[size] = self.pool.capture(
                        "full", size, lambda inputs=inputs: self.forward_fn(*inputs))  # bound now, not late
            if cuda:
                torch.cuda.synchronize()
            self._piecewise_graphed = frozenset(sizes) if piecewise else frozenset()
            facts["sizes"] = len(sizes)
            facts["graphs"] = len(self.pool.stats)
            facts["gib"] = (free_before - torch.cuda.mem_get_info()[0]) / 2**30 if cuda else 0.0
            facts["mode"] = self.mode.name
            facts["timing"] = "eager"
        self.cudagraph_status = f"cudagraphs: {self.mode.name}, {len(sizes)} sizes, {facts['gib']:.3f} GiB"

    def _buffers_device(self) -> torch.device:
        return self.dummy_inputs(1)[0].device

    def capture_summary(self) -> dict[str, Any] | None:
        """How capture went: lazy, a snapshot of LazyCapture.summary() (per size: state, seconds,
        seconds after ready) plus the pool's bytes so far; eager, the capture phase's facts;
        None without graphs."""
        if self.lazy is not None:
            out = self.lazy.summary()
            out["mode"] = self.mode.name
            out["gib"] = sum(s.bytes for s in getattr(self.pool, "stats", [])) / 2**30
            return out
        phase = next((p for p in self.record.phases if p.kind == "capture"), None)
        return dict(phase.extra) if phase is not None else None

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the lazy capture thread (after the size it is capturing) and join it; True when
        no capture thread runs any more. Graphs captured so far stay usable."""
        return self.lazy.close(timeout) if self.lazy is not None else True

    def __del__(self) -> None:
        lazy = self.__dict__.get("lazy")
        if lazy is not None:
            lazy.close(timeout=0.0)

    # ---- run ----------------------------------------------------------------------------------

    def input_buffers(self, n: int) -> tuple[torch.Tensor, ...]:
        """Views of kiln's static input buffers for a batch of n (cudagraph_copy_inputs=False)."""
        if not self._buffers:
            raise RuntimeError("no static input buffers: CUDA graphs were not captured")
        return tuple(b[:n] for b in self._buffers)

    def uses_graphs(self, n: int) -> bool:
        """Whether a batch of n runs on captured graphs (and so on kiln's static buffers)."""
        return self.mode != CUDAGraphMode.NONE and 0 < n <= self.config.max_capture_size

    def place(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`inputs` as kiln will take them: with graphs and cudagraph_copy_inputs=False, copied
        into the views of `input_buffers(n)` (the caller's side of the no-copy contract, for
        callers that do not keep their own batches in kiln's buffers); otherwise unchanged."""
        n = inputs[0].shape[0]
        if self.config.cudagraph_copy_inputs or not self.uses_graphs(n):
            return inputs
        self._check_inputs(inputs)
        views = self.input_buffers(n)
        for view, value in zip(views, inputs):
            view.copy_(value)
        return views

    def __call__(self, *inputs: torch.Tensor, decode: bool | None = None) -> Any:
        n = inputs[0].shape[0]
        if n == 0:
            raise ValueError("a batch of 0 tokens: kiln runs batches of at least 1")
        if not self.uses_graphs(n):
            return self.forward_fn(*inputs)
        if decode is None and self.mode.separate_routine():
            is_decode = getattr(self.model, "is_decode_batch", None)
            decode = bool(is_decode(*inputs)) if is_decode is not None else False
        routine = self.mode.decode_mode() if decode else self.mode.mixed_mode()
        if routine == CUDAGraphMode.NONE:
            return self.forward_fn(*inputs)
        size = self.config.bs_to_padded_graph_size[n]
        if routine == CUDAGraphMode.FULL:
            entry = self.full_graphs.get(size)
            if entry is None:  # lazy capture has not got to this size: no graphs, no waiting
                return self.forward_fn(*inputs)
            self._stage_inputs(inputs, n, size)
            graph, out = entry
            private = self._full_inputs.get(size)
            if private is not None:  # captured lazily, on inputs of its own
                for dst, buf in zip(private, self._buffers):
                    dst.copy_(buf[:size])
            graph.replay()
        else:
            if size not in self._piecewise_graphed:  # not captured yet (lazy): no graphs
                return self.forward_fn(*inputs)
            self._stage_inputs(inputs, n, size)
            with graph_runtime(True, size):
                out = self.forward_fn(*[b[:size] for b in self._buffers])
        return _rows(out, n)

    def _check_inputs(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """The inputs fit kiln's static buffers: same count, trailing shape, dtype and device
        (copy_ would broadcast or cast silently)."""
        if len(inputs) != len(self._buffers):
            raise ValueError(f"expected {len(self._buffers)} inputs, got {len(inputs)}")
        for i, (buf, value) in enumerate(zip(self._buffers, inputs)):
            if (value.shape[1:], value.dtype, value.device) != (buf.shape[1:], buf.dtype, buf.device):
                raise ValueError(
                    f"input {i}: shape {tuple(value.shape)} {value.dtype} on {value.device} does not fit "
                    f"kiln's static buffer (N, {', '.join(map(str, buf.shape[1:]))}) {buf.dtype} on {buf.device}")

    def _stage_inputs(self, inputs: tuple[torch.Tensor, ...], n: int, size: int) -> None:
        if self.config.cudagraph_copy_inputs:
            self._check_inputs(inputs)
            for buf, value in zip(self._buffers, inputs):
                buf[:n].copy_(value)
        else:
            for i, (buf, value) in enumerate(zip(self._buffers, inputs)):
                if value.data_ptr() != buf.data_ptr():
                    raise ValueError(
                        f"input {i} is not kiln's static buffer: with cudagraph_copy_inputs=False "
                        "pass the views from KilnModel.input_buffers(n), or set "
                        "cudagraph_copy_inputs=True to let kiln copy")
        for buf, value in zip(self._buffers, self._pad):
            if size > n:
                buf[n:size].fill_(value)


def _rows(out: Any, n: int) -> Any:
    if isinstance(out, torch.Tensor):
        return out[:n]
    if isinstance(out, (tuple, list)):
        return type(out)(_rows(o, n) for o in out)
    return out


def _phase(name: str, kind: str, start: float, end: float) -> Phase:
    return Phase(name, kind, start, end, max(0.0, end - start))
