"""Split a Dynamo FX graph into pieces at the splitting ops.

Every occurrence of a splitting op becomes a piece of its own, run eagerly; the stretches of
graph between them become the pieces Inductor compiles. A model with L attention layers thus
yields 2L+1 pieces, of which the L-1 middle compiled ones are structurally identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from kiln.workers.torch_internals import OpOverload, OpOverloadPacket


def op_names(target: object) -> set[str]:
    """The names a call_function target answers to: `ns::op` and, for overloads, `ns::op.overload`.

    torch's Python-level functions (e.g. torch.nn.functional.scaled_dot_product_attention, which
    Dynamo records as torch._C._nn.scaled_dot_product_attention) answer to `aten::<name>`, the
    aten op they dispatch to, so unmodified models can be split at their attention.
    """
    if isinstance(target, OpOverload):
        packet = target._schema.name  # "ns::op"
        overload = target._overloadname
        return {packet, f"{packet}.{overload}"}
    if isinstance(target, OpOverloadPacket):
        packet = target._qualified_op_name
        return {packet, f"{packet}.default"}
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name and (module.startswith("torch") or type(target).__name__ == "builtin_function_or_method"):
        return {f"aten::{name}", f"aten::{name}.default"}
    return set()


def is_splitting_node(node: fx.Node, splitting_ops: list[str]) -> bool:
    return node.op == "call_function" and not op_names(node.target).isdisjoint(splitting_ops)


@dataclass
class Piece:
    """One piece of a split graph: a submodule of the split module, in execution order."""

    index: int
    """Position of the piece in execution order (0-based)."""
    name: str
    """Attribute name of the submodule in the split module (`submod_<i>`)."""
    module: fx.GraphModule
    """The piece's own graph; returns a tuple (see `_make_outputs_tuple`)."""
    is_splitting: bool
    """True for a splitting-op piece, which runs eagerly and is never captured or compiled."""
    returns_single: bool
    """The split module expects a bare value, not a 1-tuple, from this piece."""


def split_graph(gm: fx.GraphModule, splitting_ops: list[str]) -> tuple[fx.GraphModule, list[Piece]]:
    """Split `gm` at `splitting_ops`; return the split module and its pieces in order."""
    partition: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_splitting_node(node, splitting_ops):
            # The splitting op sits alone in its partition, between two compiled ones.
            current += 1
            partition[node] = current
            current += 1
        else:
            partition[node] = current
    split_gm = split_module(gm, None, lambda n: partition[n], keep_original_order=True)

    splitting_names = {f"submod_{partition[n]}" for n in partition if is_splitting_node(n, splitting_ops)}
    pieces: list[Piece] = []
    for node in split_gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = getattr(split_gm, node.target)
        returns_single = _make_outputs_tuple(module)
        pieces.append(Piece(len(pieces), node.target, module, node.target in splitting_names, returns_single))
    return split_gm, pieces


def _make_outputs_tuple(gm: fx.GraphModule) -> bool:
    """Rewrite `gm` to return a tuple (what Inductor's artifacts return); True if it returned a bare value."""
    output = next(iter(reversed(gm.graph.nodes)))
    assert output.op == "output"
    value = output.args[0]
    if isinstance(value, (tuple, list)):
        return False
    output.args = ((value,),)
    gm.recompile()
    return True
