"""The key of a cached trace: everything Dynamo's guards would check, known before tracing.

Dynamo bakes into its graph what the forward reads besides its tensor inputs: attributes of the
module and its submodules (an RMSNorm's eps, a scaling factor, a flag), the parameters' and
buffers' shapes, dtypes, devices and strides, the non-tensor arguments, the global state it
guards (grad mode, default dtype, autocast, deterministic algorithms), its own configuration.
Two models with the same code and the same weight shapes can differ only in such a value, and
a cached graph from one must never run the other: `trace_factors` puts every one of them in
the key. The traced source files, only known once a trace has run, are checked when the record
is read (cached_trace.py).

A value kiln cannot describe the same way in every process (an object without a plain
`__dict__`, a tensor attribute that is not a parameter or buffer) makes the model unkeyable
(`UnkeyableModel`, naming it): such a model is always traced. When in doubt, trace.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch

from kiln.workers import torch_internals
from kiln.workers.compilation.factors import _json_value, kiln_source_hash, kiln_version

TRACE_SCHEMA = 1

# nn.Module's own bookkeeping: parameters, buffers and submodules are keyed on their own; the
# hook dicts are keyed by the hooks they hold (an added hook changes the traced graph).
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
# Hooks that never run in a forward (state-dict loading/saving, backward) stay out.
_NOT_FORWARD = ("state_dict", "_backward", "_load_")
_MAX_DEPTH = 8


class UnkeyableModel(ValueError):
    """A model holding a value the trace key cannot describe (so it is traced every time)."""


def _value(value: Any, where: str, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """`value` as plain JSON that is the same in every process, or UnkeyableModel."""
    if depth > _MAX_DEPTH:
        raise UnkeyableModel(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return f"torch:{value}"
    if isinstance(value, enum.Enum):
        return f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        # What a function does is its source, covered by the traced files' hash.
        return f"callable:{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
    if isinstance(value, torch.nn.Module):
        return f"module:{type(value).__module__}.{type(value).__qualname__}"
    if id(value) in seen:
        return "<cycle>"
    seen = seen | {id(value)}
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_value(v, f"{where}[{i}]", depth + 1, seen) for i, v in enumerate(value)]]
    if isinstance(value, (set, frozenset)):
        return ["set", sorted((_value(v, where, depth + 1, seen) for v in value), key=repr)]
    if isinstance(value, dict):
        return ["dict", [[repr(k), _value(v, f"{where}[{k!r}]", depth + 1, seen)]
                         for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]]
    if isinstance(value, torch.Tensor):
        raise UnkeyableModel(f"{where}: a tensor that is neither a parameter nor a buffer")
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return [kind, _value(fields, where, depth + 1, seen)]
    for method in ("to_dict", "model_dump"):  # transformers' configs, pydantic models
        if callable(getattr(value, method, None)):
            return [kind, _value(getattr(value, method)(), where, depth + 1, seen)]
    if type(value).__dict__.get("__slots__") is None and isinstance(getattr(value, "__dict__", None), dict):
        # A plain object: its class's code is the traced source; its state is its attributes.
        return [kind, _value(vars(value), where, depth + 1, seen)]
    raise UnkeyableModel(f"{where}: a {kind} object, which kiln cannot key (so it cannot tell whether "
                         "a cached trace still fits)")


def _module_factors(module: torch.nn.Module) -> dict[str, Any]:
    modules = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(sub).items()
                 if k not in _MODULE_INTERNALS and not any(s in k for s in _NOT_FORWARD)}
        modules[path or "<root>"] = [f"{type(sub).__module__}.{type(sub).__qualname__}",
                                     _value(attrs, path or "<root>")]
    tensors, first_name = {}, {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        # A weight shared under two names is one graph input: the sharing is part of the key.
        alias = first_name.setdefault(id(t), name)
        tensors[name] = [type(t).__name__, str(t.dtype), str(t.device), list(t.shape), list(t.stride()),
                         t.requires_grad, alias if alias != name else None]
    return {"modules": modules, "tensors": tensors}


def _inputs_factors(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    named = {**{f"#{i}": v for i, v in enumerate(args)}, **{k: v for k, v in kwargs.items()}}
    out, batch_of = {}, {}
    for name, v in named.items():
        if isinstance(v, torch.Tensor):
            batch = v.shape[0] if v.dim() else None
            # Inputs that share a batch size share one symbol in the graph; a batch of 1 is static.
            group = None if batch is None else "1" if batch == 1 else batch_of.setdefault(batch, f"b{len(batch_of)}")
            out[name] = ["tensor", str(v.dtype), str(v.device), v.dim(), list(v.shape[1:]), group,
                         v.is_contiguous(), v.requires_grad]
        else:
            out[name] = ["value", _value(v, f"argument {name}")]
    return out


def global_state() -> dict[str, Any]:
    """The global state Dynamo guards on and bakes into a graph."""
    state = {
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "autocast_cpu": [torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))],
    }
    if torch.cuda.is_available():
        state["autocast_cuda"] = [torch.is_autocast_enabled("cuda"), str(torch.get_autocast_dtype("cuda"))]
    return state


def trace_factors(module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any],
                  config_hash: str) -> dict[str, Any]:
    """The key factors of the cached trace of `module` called with (args, kwargs)."""
    dynamo = {k: _json_value(k, v) for k, v in sorted(torch_internals.dynamo_portable_config().items())}
    return {
        "kind": "dynamo_trace",
        "schema": TRACE_SCHEMA,
        "config_hash": config_hash,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", "unknown"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "kiln": kiln_version(),
        "kiln_source": kiln_source_hash(),
        "dynamo_config": dynamo,
        "global_state": global_state(),
        "forward": _value(getattr(module.forward, "__func__", module.forward), "forward"),
        "model": _module_factors(module),
        "inputs": _inputs_factors(args, kwargs),
    }
