"""`kiln::all_reduce` (sum) and `kiln::all_gather` (concatenate) over the tensor-parallel group,
with no per-rank argument in the graph.

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


@torch.library.custom_op("kiln::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor) -> torch.Tensor:
    # x: [N, ...] -> [world * N, ...]: rank r's rows at r*N..(r+1)*N
    state = tp_state()
    out = x.new_empty((state.world_size * x.shape[0], *x.shape[1:]))
    # all_gather_single is torch 2.13's name; all_gather_into_tensor the older one (2.11)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x.contiguous(), group=state.group)
    return out


@_all_gather_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((tp_state().world_size * x.shape[0], *x.shape[1:]))


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [N, ...] of every rank along dim 0 ([world * N, ...], in rank order); the
    identity at world size 1."""
    if tp_state().world_size == 1:
        return x
    return torch.ops.kiln.all_gather(x)
