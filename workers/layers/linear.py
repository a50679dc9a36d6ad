"""Tensor-parallel linear layers, applied per rank.

- `ColumnParallelLinear`: y = x W_r^T (+ b_r), where W_r stacks this rank's rows of one or more
  checkpoint matrices (fused: q|k|v, gate|up). The output stays sharded.
- `QKVParallelLinear`: the fused q/k/v projection, split by heads. With fewer KV heads than
  ranks, KV heads are replicated: each rank holds the one KV head its query heads use.
- `RowParallelLinear`: y = all_reduce(x_r W_r^T) (+ b), W_r this rank's block of input
  columns; the bias is added once, after the sum.
- `ReplicatedLinear`: y = x W^T with the whole matrix on every rank (a MoE router: every rank
  must route every token alike).

Ranks differ only in which checkpoint slices they hold (`weight_slices()`); shapes and traced
code are the same on every rank, so identical layers and ranks share compiled artifacts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kiln.workers.layers.collectives import all_reduce
from kiln.workers.layers.parallel_state import tp_rank, tp_world_size
from kiln.workers.layers.shards import Placed, WeightSlice, empty_parameter, split_evenly


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, start + length) of checkpoint matrix `source` ([rows, in_features])."""

    source: str
    """Checkpoint name without the ".weight"/".bias" suffix, e.g. "model.layers.0.mlp.up_proj"."""
    rows: int
    start: int
    length: int


class ColumnParallelLinear(nn.Module):
    """x [N, in] -> [N, sum of block lengths]: this rank's rows of each block, stacked."""

    def __init__(self, in_features: int, blocks: list[RowBlock], bias: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.blocks = blocks
        self.out_features = sum(b.length for b in blocks)
        self.weight = empty_parameter((self.out_features, in_features), dtype, device)
        self.bias = empty_parameter((self.out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)  # [N, out_local]

    def weight_slices(self) -> Iterator[Placed]:
        offset = 0
        for b in self.blocks:
            yield self.weight, WeightSlice(f"{b.source}.weight", (b.rows, self.in_features), 0, b.start, b.length, offset)
            if self.bias is not None:
                yield self.bias, WeightSlice(f"{b.source}.bias", (b.rows,), 0, b.start, b.length, offset)
            offset += b.length


def merged_column_parallel(in_features: int, out_features: int, sources: list[str], bias: bool,
                           dtype: torch.dtype, device: torch.device) -> ColumnParallelLinear:
    """Several [out_features, in] matrices split evenly by rows and fused (gate|up)."""
    start, length = split_evenly(out_features, tp_world_size(), tp_rank(), f"{sources[0]} rows")
    return ColumnParallelLinear(in_features, [RowBlock(s, out_features, start, length) for s in sources],
                                bias, dtype, device)


@dataclass(frozen=True)
class HeadPartition:
    """The attention heads one rank computes."""

    q_start: int
    """First query head of this rank."""
    q_heads: int
    """Query heads per rank."""
    kv_start: int
    """First KV head of this rank (the one its query heads use, when KV heads are replicated)."""
    kv_heads: int
    """KV heads per rank (1 when there are fewer KV heads than ranks)."""


def partition_heads(q_heads: int, kv_heads: int, tp: int, rank: int) -> HeadPartition:
    if q_heads % kv_heads:
        raise ValueError(f"num_attention_heads {q_heads} is not a multiple of num_key_value_heads {kv_heads}")
    if q_heads % tp:
        raise ValueError(f"num_attention_heads {q_heads} is not divisible by the tensor-parallel size {tp}")
    q_local = q_heads // tp
    if kv_heads >= tp:
        if kv_heads % tp:
            raise ValueError(f"num_key_value_heads {kv_heads} is not divisible by the tensor-parallel size {tp}")
        kv_local = kv_heads // tp
        return HeadPartition(rank * q_local, q_local, rank * kv_local, kv_local)
    if tp % kv_heads:
        raise ValueError(f"the tensor-parallel size {tp} is not a multiple of num_key_value_heads {kv_heads} "
                         "(needed to replicate KV heads across ranks)")
    # tp / kv_heads consecutive ranks share KV head rank // (tp / kv_heads); their query heads all
    # belong to that head's group because a group (q_heads / kv_heads) spans whole ranks.
    return HeadPartition(rank * q_local, q_local, rank // (tp // kv_heads), 1)


class QKVParallelLinear(ColumnParallelLinear):
    """x [N, hidden] -> [N, (hq_r + 2 hkv_r) d]: this rank's q heads, then its k and v heads."""

    def __init__(self, hidden: int, head_dim: int, q_heads: int, kv_heads: int, prefix: str, bias: bool,
                 dtype: torch.dtype, device: torch.device):
        part = partition_heads(q_heads, kv_heads, tp_world_size(), tp_rank())
        d = head_dim
        blocks = [
            RowBlock(f"{prefix}.q_proj", q_heads * d, part.q_start * d, part.q_heads * d),
            RowBlock(f"{prefix}.k_proj", kv_heads * d, part.kv_start * d, part.kv_heads * d),
            RowBlock(f"{prefix}.v_proj", kv_heads * d, part.kv_start * d, part.kv_heads * d),
        ]
        super().__init__(hidden, blocks, bias, dtype, device)
        self.partition = part


class RowParallelLinear(nn.Module):
    """x_r [N, in / tp] -> all_reduce(x_r W_r^T) + b: [N, out] on every rank."""

    def __init__(self, in_features: int, out_features: int, source: str, bias: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        # O's columns follow the query heads (split evenly, like partition_heads); down's the
        # intermediate rows of gate/up.
        in_start, in_length = split_evenly(in_features, tp_world_size(), tp_rank(), f"{source} columns")
        self.source, self.in_features, self.out_features = source, in_features, out_features
        self.in_start, self.in_length = in_start, in_length
        self.weight = empty_parameter((out_features, in_length), dtype, device)
        self.bias = empty_parameter((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(torch.nn.functional.linear(x, self.weight))  # [N, out]
        return y if self.bias is None else y + self.bias

    def weight_slices(self) -> Iterator[Placed]:
        shape = (self.out_features, self.in_features)
        yield self.weight, WeightSlice(f"{self.source}.weight", shape, 1, self.in_start, self.in_length)
        if self.bias is not None:
            yield self.bias, WeightSlice.whole(f"{self.source}.bias", (self.out_features,))


class ReplicatedLinear(nn.Module):
    """x [N, in] -> [N, out], the same full weight on every rank (no communication)."""

    def __init__(self, in_features: int, out_features: int, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.source = source
        self.weight = empty_parameter((out_features, in_features), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)  # [N, out]

    def weight_slices(self) -> Iterator[Placed]:
        yield self.weight, WeightSlice.whole(f"{self.source}.weight", tuple(self.weight.shape))
