"""Which inputs of a Dynamo graph the graph may write to, and inputs that keep them safe.

kiln runs each CUDA artifact once right after compiling it, so that Triton's autotuner measures
while the artifact's files can still be packed (workers/compilation/artifacts.py). That run
must not write into the model's real state: a piece that updates a buffer in place (a KV cache,
a running statistic) gets a fresh zero tensor in that buffer's place.

The graphs are Dynamo's, before functionalization: a write is an in-place method or function
(`x.add_(y)`, `torch.relu_(x)`), an indexed assignment (`operator.setitem`, `operator.iadd`),
an `out=` or `inplace=True` argument, or an operator whose schema marks an argument as written
(`Tensor(a!)`, kiln's and other custom ops). What is written may be a view of an input (`x[i]`,
`x.view(-1)`, `x.transpose(0, 1)`), so each write is followed back through every node whose
result may alias its argument; an op of unknown aliasing counts as aliasing all its arguments.
When in doubt, an input counts as written: a needless zero tensor costs memory for one run, a
missed one corrupts the model.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx

from kiln.workers.torch_internals import OpOverload, OpOverloadPacket

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                      operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
# Methods and functions that may return their first argument itself (or a view of it) although
# no aten schema says so: conversions that are no-ops when nothing changes.
_MAY_RETURN_SELF = {"to", "type", "type_as", "float", "double", "half", "bfloat16", "int", "long",
                    "bool", "byte", "char", "short", "cpu", "cuda", "contiguous", "detach", "data",
                    "requires_grad_", "view_as", "expand_as", "reshape_as", "T", "mT", "H", "mH",
                    "real", "imag", "getattr"}
_NO_ALIAS = {"size", "dim", "numel", "stride", "shape", "dtype", "device", "is_contiguous", "item"}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_") and not name.endswith("__")


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "") or ""


def _aten_packet(name: str) -> OpOverloadPacket | None:
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    return packet if isinstance(packet, OpOverloadPacket) else None


def _schemas(node: fx.Node) -> list[Any] | None:
    """The schemas that may describe `node`'s op; None if there are none to go by."""
    target = node.target
    if isinstance(target, OpOverload):
        return [target._schema]
    if isinstance(target, OpOverloadPacket):
        return [getattr(target, o)._schema for o in target.overloads()]
    packet = _aten_packet(_name(node)) if node.op in ("call_method", "call_function") else None
    if packet is None:
        return None
    return [getattr(packet, o)._schema for o in packet.overloads()]


def _argument(node: fx.Node, schema_arg: Any, position: int) -> Any:
    if schema_arg.name in node.kwargs:
        return node.kwargs[schema_arg.name]
    if schema_arg.kwarg_only:
        return None
    return node.args[position] if position < len(node.args) else None


def _written(node: fx.Node) -> list[Any]:
    """The values (nodes, or containers of them) that `node` writes into."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return []
    out: list[Any] = []
    if "out" in node.kwargs:
        out.append(node.kwargs["out"])
    if node.kwargs.get("inplace") is True and node.args:
        out.append(node.args[0])
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(str(node.target)) if node.graph.owning_module else None
        if getattr(module, "inplace", False) and node.args:
            out.append(node.args[0])
        return out
    if node.target in _INPLACE_OPERATORS or _is_inplace_name(_name(node)):
        if node.args:
            out.append(node.args[0])
    if isinstance(node.target, (OpOverload, OpOverloadPacket)):
        for schema in _schemas(node) or []:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    out.append(_argument(node, arg, i))
    return out


def _aliased(node: fx.Node) -> list[Any]:
    """The arguments whose storage `node`'s result may share."""
    if node.op not in ("call_function", "call_method"):
        return []  # placeholders are handled by the caller; get_attr and call_module make new tensors
    name = _name(node)
    if node.target in (operator.getitem, builtins.getattr) or node.target in _INPLACE_OPERATORS:
        return list(node.args[:1])
    if name in _NO_ALIAS:
        return []
    if name in _MAY_RETURN_SELF or _is_inplace_name(name):
        return list(node.args[:1])
    schemas = _schemas(node)
    if schemas is None:  # unknown op: it may return any argument, or a view of one
        return [*node.args, *node.kwargs.values()]
    # Out= variants return their `out` argument; a call with out= is a write, seen by _written.
    functional = [s for s in schemas if not any(a.alias_info is not None and a.alias_info.is_write
                                                 for a in s.arguments)]
    if any(r.alias_info is not None for s in functional for r in s.returns):
        return [*node.args, *node.kwargs.values()]
    return []


def _nodes(value: Any) -> Iterable[fx.Node]:
    if isinstance(value, fx.Node):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _nodes(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _nodes(v)


def mutated_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions (among the graph's placeholders) of the inputs `gm` may write to."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    found: set[int] = set()
    seen: set[fx.Node] = set()
    stack = [n for node in gm.graph.nodes for value in _written(node) for n in _nodes(value)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in placeholders:
            found.add(placeholders[node])
        else:
            stack.extend(n for value in _aliased(node) for n in _nodes(value))
    return sorted(found)


def protect_inputs(inputs: Sequence[Any], mutated: Sequence[int], real: set[int]) -> list[Any]:
    """`inputs` with every mutated tensor whose id is in `real` (the model's own state) replaced
    by a zero tensor of the same shape, strides, dtype and device."""
    out = list(inputs)
    for i in mutated:
        value = out[i] if i < len(out) else None
        if isinstance(value, torch.Tensor) and id(value) in real:
            out[i] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                         device=value.device).zero_()
    return out
