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

log = logging.getLogger("kiln.runner")

CUDAGRAPHS_UNAVAILABLE = "cudagraphs: unavailable (no CUDA)"
_warned_no_cuda = False


class KilnModel:
    def __init__(
        self,
        model: torch.nn.Module,
        config: CompilationConfig,
        *,
        store: Any = None,
        rank: int = 0,
        record: CompileRecord | None = None,
    ):
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
        if device.type != "cuda":
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
        if times is not None and times.backend_start:
            record.phases.insert(0, _phase("dynamo_trace", "trace", times.dynamo_start, times.backend_start))
            if self.backend is None:  # level 2: the backend is one opaque compile
                record.phases.append(_phase("compile", "compile", times.backend_start, times.backend_end))
            record.phases.append(_phase("first_run", "run", times.backend_end, time.time()))
        else:
            record.phases.append(_phase("compile", "compile", t0, time.time()) if config.level
                                 else _phase("eager_run", "run", t0, time.time()))
        if self.mode != CUDAGraphMode.NONE:
            self._capture()
        return record

    def _capture(self) -> None:
        config, record = self.config, self.record
        sizes = list(config.cudagraph_capture_sizes or [])  # largest first
        self._buffers = [t.clone() for t in self.dummy_inputs(config.max_capture_size)]
        self.pool = GraphPool()
        piecewise = self.mode.mixed_mode() == CUDAGraphMode.PIECEWISE
        full = self.mode.has_full_cudagraphs()
        if piecewise:
            for runner in self.backend.runners:
                if not runner.is_splitting:
                    PiecewiseGraphs(runner, self.pool)
        with record.phase("capture", "capture") as facts, torch.no_grad(), fast_capture():
            free_before = torch.cuda.mem_get_info()[0]
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
                    self.full_graphs[size] = self.pool.capture("full", size, lambda: self.forward_fn(*inputs))
            torch.cuda.synchronize()
            facts["sizes"] = len(sizes)
            facts["graphs"] = len(self.pool.stats)
            facts["gib"] = (free_before - torch.cuda.mem_get_info()[0]) / 2**30
            facts["mode"] = self.mode.name
        self.cudagraph_status = f"cudagraphs: {self.mode.name}, {len(sizes)} sizes, {facts['gib']:.3f} GiB"

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
        self._stage_inputs(inputs, n, size)
        if routine == CUDAGraphMode.FULL:
            graph, out = self.full_graphs[size]
            graph.replay()
        else:
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
