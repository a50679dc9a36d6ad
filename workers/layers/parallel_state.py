"""Tensor-parallel state of this process: world size, rank, and the group collectives use.

The group is process-global state rather than an op argument so that no rank number, port or
per-rank group name ever enters a traced graph: every rank traces the very same graph, which is
what lets ranks share compiled artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class TPState:
    world_size: int = 1
    """Ranks in the tensor-parallel group."""
    rank: int = 0
    """This process's rank in that group."""
    group: object | None = None
    """torch.distributed process group of the tensor-parallel ranks (None: the default group)."""


_STATE = TPState()


def set_tp_state(world_size: int, rank: int, group: object | None = None) -> None:
    """Set this process's tensor-parallel state (called by the worker after joining the group)."""
    global _STATE
    assert world_size >= 1 and 0 <= rank < world_size, (world_size, rank)
    if world_size > 1 and not dist.is_initialized():
        raise RuntimeError(
            f"tensor parallelism with world size {world_size} needs torch.distributed to be "
            "initialized first (the kiln worker does this; in your own script call "
            "torch.distributed.init_process_group)"
        )
    _STATE = TPState(world_size, rank, group)


def tp_state() -> TPState:
    return _STATE


def tp_world_size() -> int:
    return _STATE.world_size


def tp_rank() -> int:
    return _STATE.rank
