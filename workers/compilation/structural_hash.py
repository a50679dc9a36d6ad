"""Structural hash of a piece: equal exactly when two pieces compile to the same code.

Covers the graph's code with every node renamed by position (so `layers.3.qkv.weight` and
`layers.4.qkv.weight` look alike), the inputs' shapes/strides/dtypes with symbols renamed by
first appearance and without device index, the values of any constant tensors the graph holds,
and the config hash. Rank, layer index and file locations never enter it.
"""

from __future__ import annotations

import copy
import ctypes
from collections.abc import Sequence
from typing import Any

import sympy
import torch
import torch.fx as fx
import xxhash

from kiln.cache.digest import canonical_json, digest_text


def canonical_code(gm: fx.GraphModule) -> str:
    """The graph's code with nodes renamed by position and no metadata."""
    graph = copy.deepcopy(gm.graph)
    for i, node in enumerate(graph.nodes):
        node.name = f"n{i}"
        node.type = None  # Parameter vs Tensor annotations do not change the compiled code
        if node.op == "placeholder":
            node.target = node.name
        node.meta = {}
    # python_code with verbose=False emits no source locations
    return graph.python_code(root_module="self").src


def _sym_str(value: Any, names: dict[str, str]) -> str:
    """Render an int or SymInt with symbols renamed in order of first appearance."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        for sym in sorted(expr.free_symbols, key=str):
            names.setdefault(str(sym), f"b{len(names)}")
        return str(expr.xreplace({sym: sympy.Symbol(names[str(sym)]) for sym in expr.free_symbols}))
    return str(int(value))


def describe_inputs(example_inputs: Sequence[Any]) -> list[Any]:
    """JSON-able description of a piece's inputs (shapes symbolic, no device index)."""
    names: dict[str, str] = {}
    described: list[Any] = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            described.append({
                "shape": [_sym_str(s, names) for s in value.shape],
                "stride": [_sym_str(s, names) for s in value.stride()],
                "dtype": str(value.dtype),
                "device": value.device.type,
            })
        elif isinstance(value, (torch.SymInt, int)):
            described.append({"int": _sym_str(value, names)})
        else:
            described.append({"other": type(value).__name__})
    return described


def tensor_bytes(value: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values, in row-major order (no numpy needed)."""
    cpu = value.detach().cpu().contiguous()
    return ctypes.string_at(cpu.data_ptr(), cpu.nbytes) if cpu.numel() else b""


def _constants_digest(gm: fx.GraphModule) -> str:
    h = xxhash.xxh3_128()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor):
                h.update(f"{value.dtype}{tuple(value.shape)}".encode())
                h.update(tensor_bytes(value))
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def structural_hash(gm: fx.GraphModule, example_inputs: Sequence[Any], config_hash: str) -> str:
    payload = {
        "code": canonical_code(gm),
        "inputs": describe_inputs(example_inputs),
        "constants": _constants_digest(gm),
        "config": config_hash,
    }
    return digest_text(canonical_json(payload))
