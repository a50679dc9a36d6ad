"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE) as a kiln building block, tensor-parallel per rank.

    x [N, H] → router (replicated linear) → logits [N, E]
      → top-k routing: weights [N, k] (float32), experts [N, k]
      → the N·k token-expert pairs sorted by expert: rows [N·k, H], offsets [E] (int32)
      → kiln::moe_experts: each expert's gated MLP over its rows (moe_experts.py)
      → each token's k rows, weighted and summed → all_reduce → [N, H]

On CUDA the steps after the top-k are one op, kiln::moe_routed (moe_experts.py): for a decode
step's few pairs it runs two Triton kernels on the unsorted pairs, the weighted sum fused into
the second (moe_triton.py), so no sort, gather or scatter runs at all; for more pairs it runs the
steps above inside the op. The CPU traces the steps above as they are.

Tensor parallelism splits every expert's intermediate dimension: rank r holds rows
[r·I/tp, (r+1)·I/tp) of every expert's gate and up matrices and the same columns of its down
matrix, so each rank computes a partial sum of every expert's output and one all-reduce after
the layer completes them, as for a dense MLP. The router is replicated: its input is the
all-reduced hidden state, the same on every rank, so every rank routes every token alike.

Static shapes: every size is a function of N alone (N·k pairs, E offsets), never of the routing,
and nothing is read back to the host; a decode step is captured in one CUDA graph, and the
routing, sorting and weighted sum are plain traced torch code that Inductor fuses. Nothing
forward() reads names a layer, an expert or a rank, so identical MoE layers trace to identical
pieces and compile once.

Checkpoint layouts (`ExpertWeights`): what published checkpoints and transformers 5's
`save_pretrained` write, one tensor per expert and matrix (`experts.{e}.w1/w3/w2.weight` for
Mixtral, `experts.{e}.gate_proj/up_proj/down_proj.weight` for Qwen3-MoE); and transformers 5's
in-memory fused layout (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kiln.workers.layers.moe_experts import combine, group_by_expert  # registers kiln::moe_experts, ::moe_routed
from kiln.workers.layers.collectives import all_reduce
from kiln.workers.layers.linear import ReplicatedLinear
from kiln.workers.layers.parallel_state import tp_rank, tp_world_size
from kiln.workers.layers.shards import Placed, WeightSlice, empty_parameter, split_evenly


def route(logits: torch.Tensor, top_k: int, softmax_first: bool, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] float32, experts [N, k] int64) from router logits [N, E].

    softmax_first (Qwen3-MoE): softmax over all experts, then the top k, divided by their sum
    when `renormalize` (norm_topk_prob). Otherwise (Mixtral): the top k logits, then a softmax
    over those k (the same as renormalizing the top k of the full softmax)."""
    if softmax_first:
        weights, experts = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts
    top, experts = logits.topk(top_k, dim=-1)
    return torch.softmax(top.float(), dim=-1), experts


@dataclass(frozen=True)
class ExpertWeights:
    """Where one MoE block's tensors are in the checkpoint."""

    router: str
    """The router's matrix without ".weight" ([E, H])."""
    fused: bool
    """True: `gate_up` [E, 2I, H] and `down` [E, H, I] hold all experts; False: one tensor per
    expert and matrix, `gate`/`up`/`down` being format strings with `{e}`."""
    gate: str
    up: str
    down: str

    @classmethod
    def per_expert(cls, block: str, gate: str, up: str, down: str) -> ExpertWeights:
        """`{block}.experts.{e}.{gate|up|down}.weight` ([I, H], [I, H], [H, I]) and `{block}.gate`."""
        return cls(f"{block}.gate", False, *(f"{block}.experts.{{e}}.{name}.weight" for name in (gate, up, down)))

    @classmethod
    def fused_layout(cls, block: str) -> ExpertWeights:
        """transformers 5's `{block}.experts.gate_up_proj` / `.down_proj` and `{block}.gate`."""
        gate_up = f"{block}.experts.gate_up_proj"
        return cls(f"{block}.gate", True, gate_up, gate_up, f"{block}.experts.down_proj")


class SparseMoE(nn.Module):
    """x [N, hidden] -> [N, hidden]: top-k of `num_experts` SiLU-gated expert MLPs, on this rank's
    share of every expert's `intermediate` dimension (all-reduced)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, *, softmax_first: bool,
                 renormalize: bool, weights: ExpertWeights, dtype: torch.dtype, device: torch.device):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top-k {top_k} must be between 1 and the number of experts {num_experts}")
        start, length = split_evenly(intermediate, tp_world_size(), tp_rank(), "the experts' intermediate size")
        self.hidden, self.intermediate, self.num_experts, self.top_k = hidden, intermediate, num_experts, top_k
        self.softmax_first, self.renormalize = softmax_first, renormalize
        self.sources, self.start, self.length = weights, start, length
        self.router = ReplicatedLinear(hidden, num_experts, weights.router, dtype, device)
        self.gate_up = empty_parameter((num_experts, 2 * length, hidden), dtype, device)  # gate rows, then up rows
        self.down = empty_parameter((num_experts, hidden, length), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = route(self.router(x), self.top_k, self.softmax_first, self.renormalize)  # [N, k] x2
        if x.is_cuda:  # the device is fixed at trace time: no guard on the batch
            return all_reduce(torch.ops.kiln.moe_routed(x, weights, experts, self.gate_up, self.down))  # [N, hidden]
        order, offsets = group_by_expert(experts, self.num_experts)  # [N k], [E]
        rows = x[order // self.top_k]  # [N k, hidden]: each pair's token, grouped by expert
        out = torch.ops.kiln.moe_experts(rows, offsets, self.gate_up, self.down)  # [N k, hidden], partial
        return all_reduce(combine(out, order, weights))  # [N, hidden]

    def weight_slices(self) -> Iterator[Placed]:
        e, h, i = self.num_experts, self.hidden, self.intermediate
        start, length, src = self.start, self.length, self.sources
        if src.fused:
            yield self.gate_up, WeightSlice(src.gate, (e, 2 * i, h), 1, start, length, 0)
            yield self.gate_up, WeightSlice(src.up, (e, 2 * i, h), 1, i + start, length, length)
            yield self.down, WeightSlice(src.down, (e, h, i), 2, start, length)
            return
        for x in range(e):
            yield self.gate_up, WeightSlice(src.gate.format(e=x), (i, h), 0, start, length, 0, index=x)
            yield self.gate_up, WeightSlice(src.up.format(e=x), (i, h), 0, start, length, length, index=x)
            yield self.down, WeightSlice(src.down.format(e=x), (h, i), 1, start, length, 0, index=x)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, intermediate={self.length}/{self.intermediate}, "
                f"{'softmax, top-k' if self.softmax_first else 'top-k, softmax'}"
                f"{', renormalized' if self.renormalize and self.softmax_first else ''}")
