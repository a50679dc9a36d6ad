"""Trace a module's forward with Dynamo once, then call the compiled graph directly.

Levels 2 and 3 promise one trace and no recompiles. After the first call kiln bypasses
Dynamo entirely: it knows, from the traced graph's inputs, how to build the graph's argument
list from the forward's arguments (inputs, their batch size, and the module's parameters and
buffers, held by identity) and how to rebuild the forward's return value from the graph's
outputs. That removes guard evaluation from the hot path and the 0/1 specialization that would
otherwise make batch size 1 recompile.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from kiln.workers import torch_internals
from kiln.workers.torch_internals import tree_flatten, tree_unflatten

log = logging.getLogger("kiln.trace_once")


@dataclass(frozen=True)
class _Arg:
    kind: str  # "input": forward arg #pos; "size": forward arg #pos's size(dim); "const": held value
    pos: int = 0
    dim: int = 0
    value: Any = None


def _plan_from_graph(gm: fx.GraphModule, params: list[str], held: set[int]) -> list[_Arg] | None:
    """How to build the graph's inputs from the forward's arguments, or None if we can't.

    `held`: ids of the module's parameters and buffers, the only tensors that may be bound as
    constants (any other tensor input, say one passed inside a list, changes between calls).
    """
    LocalSource, TensorProperty, TensorPropertySource = torch_internals.dynamo_sources()

    plan: list[_Arg] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if isinstance(source, LocalSource) and source.local_name in params:
            plan.append(_Arg("input", params.index(source.local_name)))
        elif (isinstance(source, TensorPropertySource) and source.prop == TensorProperty.SIZE
              and isinstance(source.base, LocalSource) and source.base.local_name in params):
            plan.append(_Arg("size", params.index(source.base.local_name), source.idx))
        elif (grapharg is not None and isinstance(grapharg.example, torch.Tensor)
              and id(grapharg.example) in held):
            # parameters and buffers: fixed objects, updated in place if at all
            plan.append(_Arg("const", value=grapharg.example))
        else:
            log.warning("trace-once: graph input %s (%s) has no direct binding; calls go through Dynamo",
                        node.name, source)
            return None
    return plan


@dataclass
class TraceTimes:
    dynamo_start: float = 0.0
    backend_start: float = 0.0
    backend_end: float = 0.0


class TraceOnce:
    """`TraceOnce(module, backend)(*inputs)`: the first call traces (batch dim 0 symbolic) and
    compiles through `backend`; later calls run the compiled graph with no Dynamo in between."""

    def __init__(self, module: torch.nn.Module, backend: Callable[..., Any], *, dynamic_batch: bool = True):
        self.module = module
        self.backend = backend
        self.dynamic_batch = dynamic_batch
        self.params = [p for p in inspect.signature(module.forward).parameters]
        self.times = TraceTimes()
        self._graph_fn: Callable[..., Any] | None = None
        self._plan: list[_Arg] | None = None
        self._out_spec: Any = None
        self._dynamo_fn: Callable[..., Any] | None = None
        self.direct = False

    def _capture(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        if self._graph_fn is not None:
            why = ("the forward's control flow or input types changed between calls" if self.direct else
                   "calls go through Dynamo (the forward's inputs could not be bound directly: see the "
                   "warning above), and Dynamo specializes batch sizes 0 and 1 and changed guards")
            raise RuntimeError(f"kiln traces the forward once and never recompiles, but Dynamo asked for "
                               f"a second graph: {why}")
        self.times.backend_start = time.time()
        held = {id(t) for t in (*self.module.parameters(), *self.module.buffers())}
        self._plan = _plan_from_graph(gm, self.params, held)
        self._graph_fn = self.backend(gm, example_inputs)
        self.times.backend_end = time.time()
        return self._graph_fn

    def trace(self, *inputs: Any) -> Any:
        """Trace and compile with these example inputs; returns their output."""
        assert self._graph_fn is None, "already traced"
        if self.dynamic_batch:
            for value in inputs:
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    torch_internals.mark_dynamic(value, 0)
        self._dynamo_fn = torch.compile(self.module, backend=self._capture, fullgraph=True)
        self.times.dynamo_start = time.time()
        result = self._dynamo_fn(*inputs)
        self._bind_outputs(result, inputs)
        return result

    def _bind_outputs(self, result: Any, inputs: Sequence[Any]) -> None:
        if self._plan is None:
            return
        leaves, spec = tree_flatten(result)
        graph_out = self._graph_fn(*self._flat_args(inputs))
        if (len(graph_out) == len(leaves)
                and all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                        and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(graph_out, leaves))):
            self._out_spec = spec
            self.direct = True
        else:
            log.warning("trace-once: forward's outputs don't map onto the graph's; calls go through Dynamo")

    def _flat_args(self, inputs: Sequence[Any]) -> list[Any]:
        assert self._plan is not None
        out: list[Any] = []
        for arg in self._plan:
            if arg.kind == "input":
                out.append(inputs[arg.pos])
            elif arg.kind == "size":
                out.append(inputs[arg.pos].shape[arg.dim])
            else:
                out.append(arg.value)
        return out

    def __call__(self, *inputs: Any) -> Any:
        if self._graph_fn is None:
            return self.trace(*inputs)
        if not self.direct:
            return self._dynamo_fn(*inputs)
        return tree_unflatten(list(self._graph_fn(*self._flat_args(inputs))), self._out_spec)
