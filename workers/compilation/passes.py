"""Inductor post-grad passes: kiln's no-op elimination and the user's `inductor_passes`.

All of them run inside one `PostGradPassManager`, installed as Inductor's
`post_grad_custom_post_pass`. Its uuid() covers every pass's identity (source hash), which
Inductor's own caching relies on; kiln's config hash covers the same identities on its own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import xxhash
from kiln.workers import torch_internals
from kiln.workers.config.pass_config import pass_identity

log = logging.getLogger("kiln.passes")
aten = torch.ops.aten

_SAME_SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
    aten.alias.default,
}


def _shape(node: Any) -> tuple[str, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(str(s) for s in val.shape)


def _is_full_slice(node: fx.Node) -> bool:
    defaults = [None, 0, None, None, 1]  # aten.slice.Tensor(self, dim, start, end, step)
    src, dim, start, end, step = list(node.args) + defaults[len(node.args):]
    src_shape = _shape(src)
    if src_shape is None or step != 1 or start not in (0, None):
        return False
    if end is None or (isinstance(end, int) and end >= sys.maxsize // 2):
        return True
    return str(end) == src_shape[dim]


class NoOpEliminationPass:
    """Remove view/reshape/expand/alias to the shape the tensor already has, and full slices.

    Dynamo graphs carry many of these (shape plumbing between layers); left in place they cost
    a node each in every piece and can hide fusion opportunities.
    """

    name = "noop_elimination"

    def __init__(self) -> None:
        self.removed = 0  # nodes removed over all calls (for tests and debugging)

    def __call__(self, graph: fx.Graph) -> None:
        removed = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or not node.args:
                continue
            src = node.args[0]
            if node.target in _SAME_SHAPE_OPS:
                noop = _shape(src) is not None and _shape(src) == _shape(node)
            elif node.target == aten.slice.Tensor:
                noop = _is_full_slice(node)
            else:
                noop = False
            if noop:
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                removed += 1
        self.removed += removed
        if removed:
            log.debug("noop elimination removed %d nodes", removed)


class PostGradPassManager(torch_internals.custom_graph_pass_base()):
    """Runs kiln's passes, then the user's, on each post-grad graph Inductor compiles."""

    def __init__(self, user_passes: dict[str, Callable[[fx.Graph], None]], enable_noop: bool):
        self.noop = NoOpEliminationPass() if enable_noop else None
        self.user_passes = dict(sorted(user_passes.items()))

    def __call__(self, graph: fx.Graph) -> None:
        if self.noop is not None:
            self.noop(graph)
        for name, fn in self.user_passes.items():
            fn(graph)
            log.debug("ran inductor pass %s", name)
        graph.eliminate_dead_code()

    def uuid(self) -> str:
        h = xxhash.xxh3_128()
        h.update(pass_identity("noop", NoOpEliminationPass).encode() if self.noop else b"no-noop")
        for name, fn in self.user_passes.items():
            h.update(f"{name}={pass_identity(name, fn)}".encode())
        return h.hexdigest()
