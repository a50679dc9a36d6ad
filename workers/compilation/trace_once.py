"""Trace a module's forward with Dynamo once, then call the compiled graph directly.

Levels 2 and 3 promise one trace and no recompiles. After the first call kiln bypasses
Dynamo entirely: it knows, from the traced graph's inputs, how to build the graph's argument
list from the forward's arguments (inputs, their batch size, and the module's parameters and
buffers, held by identity) and how to rebuild the forward's return value from the graph's
outputs. That removes guard evaluation from the hot path and the 0/1 specialization that would
otherwise make batch size 1 recompile.

Dynamo names a graph input by where it came from in the frame it traced: a parameter of
`forward` by name, or, when forward is wrapped by a decorator (transformers' models), an item
of the wrapper's *args or **kwargs. Both bind: positionally by index, or by keyword.
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
from kiln.workers.compilation.cached_trace import TraceCache, TraceNeeded, traced_files
from kiln.workers.torch_internals import tree_flatten, tree_unflatten

log = logging.getLogger("kiln.trace_once")


@dataclass(frozen=True)
class _Arg:
    kind: str  # "input": a forward argument; "size": its size(dim); "const": held value
    pos: int | None = None  # index among the call's positional arguments (None: keyword only)
    name: str | None = None  # keyword the argument may come by instead (None: positional only)
    dim: int = 0
    value: Any = None


_CO_VARARGS, _CO_VARKEYWORDS = inspect.CO_VARARGS, inspect.CO_VARKEYWORDS


@dataclass(frozen=True)
class _Frame:
    """The argument names of a function Dynamo may start tracing at: `forward` itself or, for a
    decorated forward (transformers' models), the decorator's wrapper. A method is called with
    (module, *args, **kwargs), so its first positional argument (`skip` = 1) is the module."""

    positional: tuple[str, ...]
    keyword_only: tuple[str, ...]
    varargs: str | None
    varkw: str | None
    skip: int

    @classmethod
    def of(cls, fn: Any, skip: int) -> _Frame | None:
        code = getattr(fn, "__code__", None)
        if code is None:
            return None
        names = code.co_varnames
        n_pos, n_kw = code.co_argcount, code.co_kwonlyargcount
        rest = iter(names[n_pos + n_kw:])
        varargs = next(rest) if code.co_flags & _CO_VARARGS else None
        varkw = next(rest) if code.co_flags & _CO_VARKEYWORDS else None
        return cls(tuple(names[:n_pos]), tuple(names[n_pos:n_pos + n_kw]), varargs, varkw, skip)

    def where(self, source: Any) -> tuple[int | None, str | None] | None:
        """(positional index, keyword) of the call argument `source` names, or None."""
        LocalSource = torch_internals.dynamo_sources()[0]
        GetItemSource, DictGetItemSource = torch_internals.dynamo_item_sources()
        if isinstance(source, LocalSource):
            name = source.local_name
            if name in self.positional[self.skip:]:
                return self.positional.index(name) - self.skip, name
            if name in self.keyword_only:
                return None, name
        elif (isinstance(source, GetItemSource) and isinstance(source.base, LocalSource)
              and source.base.local_name == self.varargs and isinstance(source.index, int)
              and not source.index_is_slice):
            # varargs holds the call's arguments after the named positional ones
            pos = len(self.positional) + source.index - self.skip
            return (pos, None) if pos >= 0 else None
        elif (isinstance(source, DictGetItemSource) and isinstance(source.base, LocalSource)
              and source.base.local_name == self.varkw and isinstance(source.index, str)):
            return None, source.index
        return None


def _frames(module: torch.nn.Module) -> list[_Frame]:
    """Candidate frames, outermost first: the forward's function and what it wraps."""
    forward = module.forward
    fn = getattr(forward, "__func__", forward)  # a method, or a function set on the instance
    skip = 1 if fn is not forward else 0
    frames: list[_Frame] = []
    while fn is not None and len(frames) < 8:
        frame = _Frame.of(fn, skip)
        if frame is not None:
            frames.append(frame)
        fn = getattr(fn, "__wrapped__", None)
    return frames


def _plan_from_graph(gm: fx.GraphModule, frames: list[_Frame], held: set[int]) -> list[_Arg] | None:
    """How to build the graph's inputs from the forward's arguments, or None if we can't.

    `held`: ids of the module's parameters and buffers, the only tensors that may be bound as
    constants (any other tensor input, say one passed inside a list, changes between calls).
    Tried against each candidate frame; the first that binds every input wins.
    """
    for frame in frames:
        plan = _plan_for_frame(gm, frame, held)
        if plan is not None:
            return plan
    return None


def _plan_for_frame(gm: fx.GraphModule, frame: _Frame, held: set[int]) -> list[_Arg] | None:
    _, TensorProperty, TensorPropertySource = torch_internals.dynamo_sources()
    plan: list[_Arg] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        if (isinstance(source, TensorPropertySource) and source.prop == TensorProperty.SIZE
                and (at := frame.where(source.base)) is not None):
            plan.append(_Arg("size", *at, dim=source.idx))
        elif source is not None and (at := frame.where(source)) is not None:
            plan.append(_Arg("input", *at))
        elif (grapharg is not None and isinstance(grapharg.example, torch.Tensor)
              and id(grapharg.example) in held):
            # parameters and buffers: fixed objects, updated in place if at all
            plan.append(_Arg("const", value=grapharg.example))
        else:
            return None
    return plan


def _unbound_inputs(gm: fx.GraphModule, held: set[int]) -> str:
    names = []
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None)
        if not (isinstance(example, torch.Tensor) and id(example) in held):
            names.append(f"{node.name} from {getattr(grapharg, 'source', None)}")
    return "; ".join(names)


def _argument(arg: _Arg, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    if arg.pos is not None and arg.pos < len(args):
        return args[arg.pos]
    if arg.name is None:
        raise TypeError(f"trace-once: the forward was traced with a positional argument #{arg.pos}, "
                        f"but this call has {len(args)}")
    return kwargs[arg.name]


@dataclass
class TraceTimes:
    dynamo_start: float = 0.0
    """When tracing began (or, replaying a cached trace, when reading it began)."""
    backend_start: float = 0.0
    backend_end: float = 0.0
    replayed: bool = False
    """The graph came from the trace cache: no Dynamo ran."""


class TraceOnce:
    """`TraceOnce(module, backend)(*inputs)`: the first call traces (batch dim 0 symbolic) and
    compiles through `backend`; later calls run the compiled graph with no Dynamo in between."""

    def __init__(self, module: torch.nn.Module, backend: Callable[..., Any], *, dynamic_batch: bool = True,
                 cache: TraceCache | None = None):
        self.module = module
        self.backend = backend
        self.cache = cache
        """Where the first trace is kept and a later start reads it back (level 3 with a store)."""
        self.dynamic_batch = dynamic_batch
        self.frames = _frames(module)
        self.times = TraceTimes()
        self._graph_fn: Callable[..., Any] | None = None
        self._plan: list[_Arg] | None = None
        self._out_spec: Any = None
        self._dynamo_fn: Callable[..., Any] | None = None
        self._traced_files: list[str] = []
        self.direct = False
        self.indirect_reason = ""
        """Why calls go through Dynamo (not bound directly), once traced; "" when direct."""

    def _not_direct(self, reason: str) -> None:
        self.indirect_reason = reason
        log.warning("trace-once: %s; calls go through Dynamo", reason)

    def _capture(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        if self._graph_fn is not None:
            why = ("the forward's control flow or input types changed between calls" if self.direct else
                   f"calls go through Dynamo ({self.indirect_reason}), and Dynamo specializes batch "
                   "sizes 0 and 1 and changed guards")
            raise RuntimeError(f"kiln traces the forward once and never recompiles, but Dynamo asked for "
                               f"a second graph: {why}")
        self.times.backend_start = time.time()
        held = {id(t) for t in (*self.module.parameters(), *self.module.buffers())}
        self._plan = _plan_from_graph(gm, self.frames, held)
        if self._plan is None:
            self._not_direct("the graph's inputs have no direct binding to the forward's arguments "
                             f"({_unbound_inputs(gm, held)})")
        if self.cache is not None:
            self.cache.remember(self.module, self._plan)
            self._traced_files = traced_files(gm)
        self._graph_fn = self.backend(gm, example_inputs)
        self.times.backend_end = time.time()
        return self._graph_fn

    def trace(self, *inputs: Any, **kw_inputs: Any) -> Any:
        """Trace and compile with these example inputs (or rebuild the graph from the trace
        cache, when it holds this model, call and config); returns their output."""
        assert self._graph_fn is None, "already traced"
        if self.cache is not None:
            replayed = self._replay(inputs, kw_inputs)
            if replayed is not None:
                return replayed[0]
        if self.dynamic_batch:
            for value in (*inputs, *kw_inputs.values()):
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    torch_internals.mark_dynamic(value, 0)
        self._dynamo_fn = torch.compile(self.module, backend=self._capture, fullgraph=True)
        self.times.dynamo_start = time.time()
        result = self._dynamo_fn(*inputs, **kw_inputs)
        self._bind_outputs(result, inputs, kw_inputs)
        if self.cache is not None and self.direct:
            self.cache.save(self._out_spec, self._traced_files, self.backend)
        return result

    def _replay(self, inputs: Sequence[Any], kw_inputs: dict[str, Any]) -> tuple[Any] | None:
        """(output,) of the first call through a cached trace, or None to trace with Dynamo."""
        from kiln.workers.compilation.piece_replay import rebuild

        assert self.cache is not None
        start = time.time()
        replay = self.cache.load(self.module, inputs, kw_inputs)
        if replay is None:
            return None
        self.times = TraceTimes(dynamo_start=start, backend_start=time.time(), replayed=True)
        try:
            graph_fn = rebuild(self.backend, replay, inputs, kw_inputs)
        except TraceNeeded as exc:
            self.cache.status = f"ran ({exc})"
            log.info("trace cache: %s", self.cache.status)
            self.times = TraceTimes()
            return None
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            # A record that passed its digest but does not rebuild: never run it, drop it.
            self.cache.drop(f"cached trace unusable: {type(exc).__name__}: {exc}")
            self.times = TraceTimes()
            return None
        self.times.backend_end = time.time()
        self._plan = [_Arg("const", value=c) if b.kind == "const" else _Arg(b.kind, b.pos, b.name, dim=b.dim)
                      for b, c in zip(replay.bindings, replay.constants)]
        self._graph_fn, self._out_spec, self.direct = graph_fn, replay.out_spec, True
        self.cache.status = "skipped (cached)"
        return (tree_unflatten(list(graph_fn(*self._flat_args(inputs, kw_inputs))), self._out_spec),)

    def _bind_outputs(self, result: Any, inputs: Sequence[Any], kw_inputs: dict[str, Any]) -> None:
        if self._plan is None:
            return
        leaves, spec = tree_flatten(result)
        graph_out = self._graph_fn(*self._flat_args(inputs, kw_inputs))
        if (len(graph_out) == len(leaves)
                and all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                        and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(graph_out, leaves))):
            self._out_spec = spec
            self.direct = True
        else:
            others = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)})
            self._not_direct(
                f"the forward's output holds {', '.join(others)}, which kiln cannot rebuild from the graph's "
                "outputs (only tensors in tuples, lists, dicts and registered pytrees such as ModelOutput)"
                if others else f"the forward's {len(leaves)} output tensors do not match the graph's "
                f"{len(graph_out)} outputs")

    def _flat_args(self, inputs: Sequence[Any], kw_inputs: dict[str, Any]) -> list[Any]:
        assert self._plan is not None
        out: list[Any] = []
        for arg in self._plan:
            if arg.kind == "input":
                out.append(_argument(arg, inputs, kw_inputs))
            elif arg.kind == "size":
                out.append(_argument(arg, inputs, kw_inputs).shape[arg.dim])
            else:
                out.append(arg.value)
        return out

    def __call__(self, *inputs: Any, **kw_inputs: Any) -> Any:
        if self._graph_fn is None:
            return self.trace(*inputs, **kw_inputs)
        if not self.direct:
            return self._dynamo_fn(*inputs, **kw_inputs)
        return tree_unflatten(list(self._graph_fn(*self._flat_args(inputs, kw_inputs))), self._out_spec)
