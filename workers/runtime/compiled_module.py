"""`kiln.compile(module)`: any nn.Module compiled the kiln way, without the batch contract.

    compiled = kiln.compile(model)                 # level 3: trace once, split at attention
    out = compiled(input_ids, use_cache=False)     # or input_ids=...: calls are bound by name

The first call traces the forward once with Dynamo, dimension 0 of every tensor argument
symbolic (the batch), splits the graph at the splitting ops (by default attention: kiln's op
and torch's scaled_dot_product_attention), and compiles or loads each piece through the cache
(`PiecewiseBackend`). Later calls bind their arguments straight to the traced graph: a new
batch size never recompiles. What the trace fixed cannot change between calls, and a call that
changes it is an error naming the argument rather than a silently wrong result: every tensor
keeps its dtype, device, rank, non-batch dimensions and contiguity, other arguments keep their
values. A forward whose output kiln cannot rebuild from the graph's outputs (an object other
than tensors in tuples, lists, dicts or registered pytrees: transformers' DynamicCache with
use_cache=True) still runs, through Dynamo's guards, with a warning saying so.

Inference only: calls run under torch.no_grad(). No CUDA graphs (`cudagraph_mode` is not
used here): capturing needs static input buffers and padding, which KilnModel provides for
models with kiln's batch contract.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch

from kiln.workers import torch_internals
from kiln.workers.compilation.backend import compile_forward
from kiln.workers.compilation.record import CompileRecord
from kiln.workers.compilation.trace_once import TraceOnce
from kiln.workers.config import CompilationConfig
from kiln.workers.config.modes import CompilationLevel

_SIMPLE = (type(None), bool, int, float, str)


def _what(value: Any) -> tuple[Any, ...]:
    """What a call argument must keep from the traced call: a tensor its dtype, device, rank,
    non-batch dimensions and contiguity (the compiled code assumes its strides); a simple value
    itself; any other object its identity."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.device, value.dim(), tuple(value.shape[1:]), value.is_contiguous())
    if isinstance(value, _SIMPLE):
        return ("value", type(value), value)
    return ("object", type(value).__name__, id(value))


def _describe(what: tuple[Any, ...]) -> str:
    if what[0] == "tensor":
        _, dtype, device, dim, rest, contiguous = what
        shape = "()" if dim == 0 else f"(N, {', '.join(map(str, rest))})" if rest else "(N,)"
        return f"a {'' if contiguous else 'non-contiguous '}{dtype} tensor of shape {shape} on {device}"
    if what[0] == "value":
        return repr(what[2])
    return f"a {what[1]} object (id {what[2]}; only tensors may change between calls)"


def canonical_call(signature: inspect.Signature | None, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call in one form whatever its style: defaults filled in, every argument that can go
    by keyword as a keyword (so `m(x)` and `m(input_ids=x)` trace and bind alike)."""
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"kiln.compile: the call does not fit the forward's signature: {exc}") from None
    bound.apply_defaults()
    params = signature.parameters
    # Before a non-empty *args, positional-or-keyword arguments must stay positional.
    varargs = any(params[n].kind == inspect.Parameter.VAR_POSITIONAL and v for n, v in bound.arguments.items())
    positional, keywords = [], {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            positional.extend(value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            keywords.update(value)
        elif kind == inspect.Parameter.POSITIONAL_ONLY or (varargs and kind == inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional.append(value)
        else:
            keywords[name] = value
    return tuple(positional), keywords


def _named(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**{f"argument {i}": v for i, v in enumerate(args)}, **{repr(k): v for k, v in kwargs.items()}}


class CallShape:
    """The traced call's structure (in canonical form); `check` refuses a call that the traced
    graph would not fit."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        named = _named(args, kwargs)
        self.whats = {name: _what(v) for name, v in named.items()}
        tensors = {name: v for name, v in named.items() if isinstance(v, torch.Tensor) and v.dim()}
        # Tensors traced with dim 0 == 1 had it specialized by Dynamo: it stays 1.
        self.static_batch = {name for name, v in tensors.items() if v.shape[0] == 1}
        # Tensors that shared a batch size in the trace may share one symbol: they keep sharing.
        groups: dict[int, list[str]] = {}
        for name, v in tensors.items():
            if name not in self.static_batch:
                groups.setdefault(v.shape[0], []).append(name)
        self.same_batch = [names for names in groups.values() if len(names) > 1]

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        why = ("kiln.compile traced the forward once (only dimension 0 of each tensor symbolic) "
               "and binds later calls to that graph")
        named = _named(args, kwargs)
        if named.keys() != self.whats.keys():
            raise ValueError(f"{why}: it was traced with arguments {', '.join(self.whats)}; this call has "
                             f"{', '.join(named)}")
        for name, value in named.items():
            want, got = self.whats[name], _what(value)
            if got != want:
                raise ValueError(f"{why}: {name} was {_describe(want)}, now {_describe(got)}")
            if name in self.static_batch and value.shape[0] != 1:
                raise ValueError(f"{why}: {name} had dimension 0 of size 1 in the traced call, which "
                                 f"Dynamo specializes; now {value.shape[0]}")
        for names in self.same_batch:
            sizes = {name: named[name].shape[0] for name in names}
            if len(set(sizes.values())) > 1:
                raise ValueError(f"{why}: {', '.join(names)} had one batch size in the traced call, "
                                 f"now {sizes}")


def _batch_of_two(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The call with every tensor's dim 0 doubled, when all of them have batch 1 (Dynamo would
    specialize a symbolic size of 1); None otherwise."""
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return None

    def two(v: Any) -> Any:
        return torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() else v

    return tuple(two(v) for v in args), {k: two(v) for k, v in kwargs.items()}


class CompiledModule:
    """What `kiln.compile` returns: call it like the module. Attributes the module has and this
    object does not (`config`, `generate`, …) are the module's."""

    def __init__(self, module: torch.nn.Module, config: CompilationConfig, store: Any):
        self.module = module
        self.compilation_config = config
        self.record = CompileRecord()
        """Timings and counters of the compile (inductor_compiles, cache hits, pieces, …)."""
        self._forward, self.backend = compile_forward(module, config, store=store, record=self.record)
        self._call_shape: CallShape | None = None
        try:
            self._signature: inspect.Signature | None = inspect.signature(module.forward)
        except (TypeError, ValueError):  # a builtin or C forward: calls are taken as they come
            self._signature = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            traced = self._forward if isinstance(self._forward, TraceOnce) else None
            if traced is None:
                return self._forward(*args, **kwargs)
            args, kwargs = canonical_call(self._signature, args, kwargs)
            if self._call_shape is None:
                # Dynamo's and Inductor's imports (seconds) get a phase of their own, not the
                # first trace's or load's (as in KilnModel.compile).
                with self.record.phase("import_compiler", "setup"):
                    torch_internals.import_compiler()
                # Trace, compile or load, first run: where Inductor would autotune, counted.
                with torch_internals.count_autotune_benchmarks() as tuned:
                    try:
                        return self._first_call(traced, args, kwargs)
                    finally:
                        self.record.autotune_benchmarks += tuned.calls
            if traced.direct:  # through Dynamo its guards decide (and a second graph is an error)
                self._call_shape.check(args, kwargs)
            return traced(*args, **kwargs)

    forward = __call__

    def _first_call(self, traced: TraceOnce, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        doubled = _batch_of_two(args, kwargs)
        if doubled is None:
            result = traced.trace(*args, **kwargs)
        else:
            traced.trace(*doubled[0], **doubled[1])
            if not traced.direct:
                raise RuntimeError(
                    "kiln.compile: the first call has batch size 1, which Dynamo specializes, so kiln traced "
                    f"a batch of 2; but {traced.indirect_reason}, so calls go through Dynamo, and batch 1 "
                    "would be a second graph. Call it first with a batch of 2 or more")
        self._call_shape = CallShape(*(doubled or (args, kwargs)))
        if traced.cache is not None:
            self.record.trace_cache = traced.cache.status
        if not traced.direct:
            warnings.warn(
                f"kiln.compile: {traced.indirect_reason}; calls go through Dynamo and its guards: batch sizes "
                "of 2 and more reuse the traced graph, batch 1 would need a second graph and is refused "
                "(transformers models: pass use_cache=False to return tensors only)", stacklevel=3)
        return result if doubled is None else traced(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only called for names this object lacks; "module" itself must exist first.
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self) -> str:
        return f"kiln.CompiledModule(level={int(self.compilation_config.level)}, {type(self.module).__name__})"


def compile(module: torch.nn.Module, config: CompilationConfig | None = None,  # noqa: A001
            cache_root: str | os.PathLike[str] | None = None) -> CompiledModule:
    """Compile `module` the kiln way (see this module's docstring) with `config` (default:
    level 3, piecewise, split at attention), cached under `cache_root` (default:
    config.cache_dir, else $KILN_CACHE_ROOT or ~/.cache/kiln)."""
    from kiln.cache import CacheStore

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"kiln.compile: expected a torch.nn.Module, got {type(module).__name__}")
    config = config if config is not None else CompilationConfig()
    if not isinstance(config, CompilationConfig):
        raise TypeError(f"kiln.compile: config must be a CompilationConfig, got {type(config).__name__}")
    store = None
    if config.level == CompilationLevel.PIECEWISE:
        root = cache_root if cache_root is not None else (config.cache_dir or None)
        store = CacheStore(root)
    return CompiledModule(module, config, store)

