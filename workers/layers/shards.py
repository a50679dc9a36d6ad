"""Which part of a checkpoint tensor a rank holds, and where it goes in the rank's parameter.

Tensor-parallel layers describe their parameters as `WeightSlice`s of the full (unsharded)
checkpoint tensors; a loader reads exactly those slices (and nothing else) into the parameters,
and a dummy initializer fills the same parameters with random values. The slices are the only
place a rank number shows: parameters have the same shapes on every rank, and no rank-dependent
value enters a traced graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightSlice:
    """Indices [start, start + length) along `dim` of checkpoint tensor `source` (full shape
    `full_shape`) go to indices [offset, offset + length) along `dim` of the rank's parameter."""

    source: str
    """Tensor name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"."""
    full_shape: tuple[int, ...]
    """Its shape in the checkpoint (checked before anything is read)."""
    dim: int
    """The dimension it is sliced along (0 for column-parallel rows, 1 for row-parallel columns)."""
    start: int
    length: int
    offset: int = 0
    index: int | None = None
    """For a stacked parameter (one entry per expert, [E, ...]): the entry this slice fills, whose
    dimensions are then the checkpoint tensor's; None: the parameter itself."""

    def __post_init__(self) -> None:
        assert 0 <= self.dim < len(self.full_shape), self
        assert 0 <= self.start and self.length >= 0 and self.start + self.length <= self.full_shape[self.dim], self
        assert self.index is None or self.index >= 0, self

    @classmethod
    def whole(cls, source: str, shape: tuple[int, ...]) -> WeightSlice:
        """The full tensor, replicated on every rank."""
        return cls(source, tuple(shape), 0, 0, shape[0])

    def local_shape(self) -> tuple[int, ...]:
        return tuple(self.length if d == self.dim else s for d, s in enumerate(self.full_shape))

    def destination(self, param: torch.Tensor) -> torch.Tensor:
        """The view of `param` this slice fills."""
        target = param if self.index is None else param[self.index]
        return target.narrow(self.dim, self.offset, self.length)


Placed = tuple[nn.Parameter, WeightSlice]
"""A rank's parameter and one checkpoint slice that fills part of it."""


def split_evenly(size: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """(start, length) of part `index` of `size` split into `parts` equal parts."""
    if size % parts:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel size {parts}")
    length = size // parts
    return index * length, length


def empty_parameter(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialized inference parameter on `device` (the loader or dummy init fills it)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def iter_placed(module: nn.Module) -> Iterator[Placed]:
    """Every (parameter, slice) of the modules under `module` that describe their weights
    (a `weight_slices()` method), each module once."""
    for sub in module.modules():
        own = getattr(sub, "weight_slices", None)
        if own is not None:
            yield from own()
