"""A traced FX graph as plain JSON, and back: what a cached trace stores instead of Dynamo's run.

Only what the graph *is* is kept: each node's op, name, target and arguments, in order, plus
small constant tensors the graph holds; a call_module node keeps only the submodule's name (the
caller puts something callable there: a piece runner). Node metadata (fake values, stack traces, Dynamo's
sources) is dropped: nothing downstream of a warm start needs it, and most of it is neither
portable nor safe to unpickle. No pickle is involved: a target is an operator name or a
function's import path, an argument a JSON value or a tagged one (tuple, slice, dtype, device…),
so decoding a corrupted or foreign record can fail but never run arbitrary code.

`encode` refuses (GraphCodecError, naming the node) anything it cannot rebuild exactly: a
target whose import path does not lead back to the same object, an
argument of another type. Its caller checks the round trip itself (see cached_trace.py).
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.fx as fx

from kiln.workers.compilation.structural_hash import tensor_bytes
from kiln.workers.torch_internals import OpOverload, OpOverloadPacket

CODEC_VERSION = 1
MAX_CONSTANT_BYTES = 1 << 20
"""Constant tensors in a graph are small (a literal torch.tensor([...])); larger ones are refused."""

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_MEMORY_FORMATS = {str(m).removeprefix("torch."): m for m in vars(torch).values()
                   if isinstance(m, torch.memory_format)}
_LAYOUTS = {str(m).removeprefix("torch."): m for m in vars(torch).values() if isinstance(m, torch.layout)}


class GraphCodecError(ValueError):
    """A graph (or a stored record of one) kiln cannot encode or decode exactly."""


# ---- targets ------------------------------------------------------------------------------------


def _encode_target(node: fx.Node) -> Any:
    target = node.target
    if node.op in ("placeholder", "call_method", "call_module", "get_attr", "output"):
        assert isinstance(target, str), node
        return target
    assert node.op == "call_function", node.op
    if isinstance(target, OpOverload):
        return {"op": target._schema.name, "overload": target._overloadname}
    if isinstance(target, OpOverloadPacket):
        return {"packet": target._qualified_op_name}
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        raise GraphCodecError(f"node {node.name}: target {target!r} has no import path")
    if not _allowed_module(module):
        raise GraphCodecError(f"node {node.name}: target {module}.{qualname} is outside {', '.join(_ROOTS)}")
    # builtins' __module__ can be "_operator" or "torch._C._nn", and torch's C functions have
    # a qualname inside a private class (torch.arange): whichever path leads back is kept.
    for name in dict.fromkeys((qualname, getattr(target, "__name__", qualname))):
        try:
            if _import_path(module, name) is target:
                return {"fn": module, "name": name}
        except (ImportError, AttributeError):
            pass
    raise GraphCodecError(f"node {node.name}: target {target!r} is not reachable as {module}.{qualname}")


_ROOTS = ("torch", "operator", "_operator", "math", "builtins")
"""Where a function target may come from: a stored record can name nothing else, so even a
record rewritten by someone who can write the cache cannot make kiln call, say, os.system."""


def _allowed_module(module: str) -> bool:
    return module.split(".", 1)[0] in _ROOTS


def _import_path(module: str, qualname: str) -> Any:
    if not _allowed_module(module):
        raise ImportError(f"{module} is outside {', '.join(_ROOTS)}")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _decode_target(op: str, data: Any) -> Any:
    if isinstance(data, str):
        return data
    try:
        if "op" in data:
            namespace, name = data["op"].split("::")
            return getattr(getattr(getattr(torch.ops, namespace), name), data["overload"])
        if "packet" in data:
            namespace, name = data["packet"].split("::")
            return getattr(getattr(torch.ops, namespace), name)
        return _import_path(data["fn"], data["name"])
    except (AttributeError, ImportError, KeyError, ValueError, RuntimeError) as exc:
        raise GraphCodecError(f"cannot resolve target {data!r}: {exc}") from None


# ---- arguments ----------------------------------------------------------------------------------


def _encode_arg(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Size):
        return {"size": [_encode_arg(v, where) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode_arg(v, where) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode_arg(v, where) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise GraphCodecError(f"{where}: a dict argument with non-string keys")
        return {"dict": [[k, _encode_arg(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode_arg(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise GraphCodecError(f"{where}: an argument of type {type(value).__name__} ({value!r:.80})")


def _decode_arg(data: Any, nodes: dict[str, fx.Node]) -> Any:
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise GraphCodecError(f"malformed argument {data!r:.80}")
    (tag, body), = data.items()
    if tag == "node":
        if body not in nodes:
            raise GraphCodecError(f"argument names node {body!r} before it is defined")
        return nodes[body]
    if tag == "float":
        return float(body)
    if tag in ("size", "tuple", "list"):
        items = [_decode_arg(v, nodes) for v in body]
        return torch.Size(items) if tag == "size" else tuple(items) if tag == "tuple" else items
    if tag == "dict":
        return {k: _decode_arg(v, nodes) for k, v in body}
    if tag == "slice":
        return slice(*(_decode_arg(v, nodes) for v in body))
    if tag == "ellipsis":
        return Ellipsis
    table = {"dtype": _DTYPES, "memory_format": _MEMORY_FORMATS, "layout": _LAYOUTS}.get(tag)
    if table is not None:
        if body not in table:
            raise GraphCodecError(f"unknown {tag} {body!r}")
        return table[body]
    if tag == "device":
        return torch.device(body)
    raise GraphCodecError(f"unknown argument tag {tag!r}")


# ---- constants ----------------------------------------------------------------------------------


def _encode_constant(gm: fx.GraphModule, name: str) -> dict[str, Any]:
    value = gm
    for part in name.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Parameter):
        raise GraphCodecError(f"get_attr {name}: a {type(value).__name__}, not a constant tensor")
    if value.nbytes > MAX_CONSTANT_BYTES:
        raise GraphCodecError(f"get_attr {name}: a constant of {value.nbytes} bytes (limit {MAX_CONSTANT_BYTES})")
    return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
            "device": str(value.device), "hex": tensor_bytes(value).hex()}


def _decode_constant(data: dict[str, Any]) -> torch.Tensor:
    dtype = _DTYPES.get(data["dtype"])
    if dtype is None:
        raise GraphCodecError(f"constant of unknown dtype {data['dtype']!r}")
    raw = bytearray(bytes.fromhex(data["hex"]))
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    if flat.numel() != math.prod(data["shape"]):
        raise GraphCodecError(f"constant of shape {data['shape']} holds {flat.numel()} values")
    return flat.reshape(data["shape"]).clone().to(data["device"])


# ---- graphs -------------------------------------------------------------------------------------


def encode(gm: fx.GraphModule) -> dict[str, Any]:
    """`gm`'s graph as JSON-able data (raises GraphCodecError for what cannot be rebuilt)."""
    nodes, constants = [], {}
    for node in gm.graph.nodes:
        where = f"node {node.name} ({node.op} {node.target})"
        if node.op == "get_attr":
            constants[node.target] = _encode_constant(gm, node.target)
        nodes.append({"op": node.op, "name": node.name, "target": _encode_target(node),
                      "args": _encode_arg(tuple(node.args), where),
                      "kwargs": _encode_arg(dict(node.kwargs), where)})
    return {"codec": CODEC_VERSION, "nodes": nodes, "constants": constants}


def decode(data: dict[str, Any]) -> fx.GraphModule:
    """The GraphModule `encode` described (raises GraphCodecError for a malformed record)."""
    if not isinstance(data, dict) or data.get("codec") != CODEC_VERSION:
        raise GraphCodecError(f"graph codec {data.get('codec') if isinstance(data, dict) else None!r}, "
                              f"expected {CODEC_VERSION}")
    root = torch.nn.Module()
    try:
        for name, constant in data["constants"].items():
            if "." in name or not name.isidentifier():
                raise GraphCodecError(f"constant name {name!r}")
            root.register_buffer(name, _decode_constant(constant), persistent=False)
        for item in data["nodes"]:
            if item["op"] == "call_module":
                name = item["target"]
                if not isinstance(name, str) or not name.isidentifier():
                    raise GraphCodecError(f"submodule name {name!r}")
                root.add_module(name, torch.nn.Module())
        graph = fx.Graph()
        nodes: dict[str, fx.Node] = {}
        for item in data["nodes"]:
            op, name = item["op"], item["name"]
            args = _decode_arg(item["args"], nodes)
            kwargs = _decode_arg(item["kwargs"], nodes)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise GraphCodecError(f"node {name}: malformed arguments")
            if op == "output":
                node = graph.output(args[0])
            else:
                node = graph.create_node(op, _decode_target(op, item["target"]), args, kwargs, name=name)
            if node.name != name:
                raise GraphCodecError(f"node name {name!r} taken twice")
            nodes[name] = node
        graph.lint()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        if isinstance(exc, GraphCodecError):
            raise
        raise GraphCodecError(f"malformed graph record: {type(exc).__name__}: {exc}") from None
    return fx.GraphModule(root, graph)
