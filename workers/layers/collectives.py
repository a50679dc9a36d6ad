"""`kiln::all_reduce`: sum over the tensor-parallel group, with no per-rank argument in the graph.

The group comes from process-global state (see parallel_state.py), so every rank traces the
very same graph and ranks can share compiled artifacts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kiln.workers.layers.parallel_state import tp_state


@torch.library.custom_op("kiln::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor) -> torch.Tensor:
    state = tp_state()
    out = x.clone()
    dist.all_reduce(out, group=state.group)
    return out


@_all_reduce_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group; the identity (no op in the graph) at world size 1."""
    if tp_state().world_size == 1:
        return x
    return torch.ops.kiln.all_reduce(x)
