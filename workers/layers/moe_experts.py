"""`kiln::moe_experts`: every expert's gated MLP over its own rows, for rows already grouped by expert;
and `kiln::moe_routed`, the whole expert part of a MoE layer after its top-k, which SparseMoE
calls on CUDA (below).

    x: [M, H]  rows sorted by expert (M = tokens × top-k: one row per token-expert pair)
    offsets: [E] int32  cumulative row counts: expert e owns rows offsets[e-1]..offsets[e]
    gate_up: [E, 2I, H]  (gate rows, then up rows; I is this rank's share of the intermediate size)
    down: [E, H, I]
    out: [M, H] = down_e · (silu(gate_e · x) * (up_e · x)) for each row's expert e

Shapes depend only on M, so the op is traced with a symbolic batch and Inductor sees one graph
per size. Routing, sorting and the weighted sum live in the traced graph around it (moe.py),
where Inductor fuses them; only this part is opaque, because no fixed-shape torch code computes
"each expert over its own rows" without either a data-dependent slice (a host sync) or running
every expert on every row (E / top-k times the work).

- CUDA, bfloat16 or float16, at most 64 rows (decode: batch 8 at top-8; $KILN_MOE_TRITON_MAX_ROWS
  changes it, 0 turns it off): two Triton kernels that read each row's expert weights directly,
  the SiLU-mul fused into the first (moe_triton.py); no empty-expert work, no host sync.
- CUDA, bfloat16, sm90/sm100, more rows: two grouped matmuls (torch's grouped GEMM, through
  torch_internals) and the activation between them; no loop over experts, nothing read back to
  the host, so a decode step with it is captured in one CUDA graph.
- Elsewhere (the CPU, and the reference): a Python loop over the experts on the host-read
  offsets, each expert's rows as one plain matmul. On CUDA this path syncs with the host, so it
  refuses to run inside a CUDA-graph capture (with a message saying what would capture).

`kiln::moe_routed(x [N, H], weights [N, k] float32, experts [N, k] int64, gate_up, down)` ->
[N, H] = Σ_j weights[n, j] · expert_{experts[n, j]}(x[n]). Up to the same row limit (N·k pairs)
it is moe_triton's two kernels over the unsorted pairs, the weighted sum over k fused into the
down projection: no sort, no gather, no scatter, two launches a layer. Above it, the sort
(group_by_expert), kiln::moe_experts' implementation and the weighted sum (combine) run inside
the op, eagerly: a few more small kernels than when Inductor fuses them, which at those sizes
the grouped matmuls dwarf. A Python branch on N in the traced forward would instead make Dynamo
guard on the batch; the op picks at run time, where N is a plain int. The CPU never calls it
(SparseMoE traces the sort and the weighted sum around kiln::moe_experts there, as before).

The ops sit inside the compiled pieces rather than being splitting ops: nothing in it needs
eager execution, and splitting would add one more eager piece per layer in piecewise CUDA-graph
mode. Adding "kiln::moe_experts" (on CUDA: "kiln::moe_routed") to `splitting_ops` makes it one
(it then runs through the eager fast path registered below).
"""

from __future__ import annotations

import torch

from kiln.workers import torch_internals
from kiln.workers.layers.activation import silu_and_mul_ref
from kiln.workers.layers.custom_op import register_eager_impl
from kiln.workers.layers.moe_triton import triton_moe_experts, triton_moe_routed, triton_moe_supported


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [M], offsets [E] int32) for the M = N·k token-expert pairs (pair j: token j // k):
    order lists the pairs sorted by expert; offsets[e] counts the pairs of experts 0..e."""
    flat = experts.reshape(-1)  # [M]
    order = torch.argsort(flat)  # [M]
    ids = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)  # [E]
    offsets = torch.searchsorted(flat[order], ids, right=True).to(torch.int32)  # [E]
    return order, offsets


def combine(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, H]: each token's k expert outputs (rows [M, H] in `order`), weighted and summed in float32."""
    n, k = weights.shape
    # Where each pair's row went: the inverse permutation of `order`. The pair numbers are built
    # from N itself: a size computed from it (N·k) would become a symbolic-int node that Dynamo
    # computes once, in the first MoE layer's piece, and passes to every later one as an extra
    # input, which would make the first MoE piece differ from the others.
    pairs = torch.arange(n, device=order.device)[:, None] * k + torch.arange(k, device=order.device)  # [N, k]
    where = torch.empty_like(order).scatter_(0, order, pairs.reshape(-1))  # [M]
    per_token = rows[where].view(n, k, rows.shape[-1])  # [N, k, H]
    return (per_token.float() * weights.unsqueeze(-1)).sum(dim=1).to(rows.dtype)


def experts_loop(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The reference: one matmul pair per expert that has rows (reads `offsets` on the host)."""
    out = x.new_empty(x.shape[0], down.shape[1])  # [M, H]
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            h = torch.nn.functional.linear(x[start:end], gate_up[e])  # [m, 2I]
            out[start:end] = torch.nn.functional.linear(silu_and_mul_ref(h), down[e])  # [m, H]
        start = end
    assert start == x.shape[0], f"offsets end at {start}, but there are {x.shape[0]} rows"
    return out


def experts_grouped(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """The same with two grouped matmuls: no loop, no host sync (CUDA bf16 sm90/sm100, or any
    device and dtype torch's `_grouped_mm` accepts)."""
    # _grouped_mm multiplies by [G, K, N] with K contiguous: the transposed weights as stored.
    h = torch_internals.grouped_mm(x.contiguous(), gate_up.transpose(1, 2), offsets)  # [M, 2I]
    a = silu_and_mul_ref(h)  # [M, I], contiguous
    return torch_internals.grouped_mm(a, down.transpose(1, 2), offsets)  # [M, H]


CAPTURE_HINT = ("kiln::moe_experts on CUDA is captured in a CUDA graph only through its Triton kernels "
                "(bfloat16/float16, few rows) or torch's grouped matmul: bfloat16 weights on an "
                "sm90/sm100 GPU, hidden and per-rank intermediate sizes multiples of 8")


def grouped_path(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the grouped matmuls run here without a host sync: torch's fast kernel for the device
    and dtype, and the 16-byte row alignment it needs (H and I multiples of 8 bf16 elements)."""
    hidden, inter = down.shape[1], down.shape[2]
    return (torch_internals.grouped_mm_fast(x) and gate_up.dtype == down.dtype == torch.bfloat16
            and hidden % 8 == 0 and inter % 8 == 0)


def moe_experts_impl(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and gate_up.dim() == 3 and down.dim() == 3, (x.shape, gate_up.shape, down.shape)
    assert offsets.shape == (gate_up.shape[0],) and offsets.dtype == torch.int32, (offsets.shape, offsets.dtype)
    if x.is_cuda:
        if triton_moe_supported(x, gate_up, down):
            return triton_moe_experts(x, offsets, gate_up, down)
        if grouped_path(x, gate_up, down):
            return experts_grouped(x, offsets, gate_up, down)
        if torch.cuda.is_current_stream_capturing():
            major, minor = torch.cuda.get_device_capability(x.device)
            raise RuntimeError(f"{CAPTURE_HINT}; got {x.dtype} on sm{major}{minor} with hidden size "
                               f"{down.shape[1]}, intermediate size {down.shape[2]} per rank: "
                               "use bfloat16, or cudagraph_mode NONE")
    return experts_loop(x, offsets, gate_up, down)


# The op Dynamo and Inductor see: opaque, with a fake implementation for tracing.
moe_experts = torch.library.custom_op("kiln::moe_experts", moe_experts_impl, mutates_args=())


@moe_experts.register_fake
def _(x, offsets, gate_up, down):
    return x.new_empty(x.shape[0], down.shape[1])


# Should a user make it a splitting op, its eager pieces call the implementation directly.
register_eager_impl(torch.ops.kiln.moe_experts, moe_experts_impl)


def moe_routed_impl(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """[N, H]: Σ_j weights[n, j] · expert_{experts[n, j]}(x[n]) (this rank's partial sum)."""
    n, k = experts.shape
    assert x.dim() == 2 and weights.shape == (n, k) and x.shape[0] == n, (x.shape, weights.shape, experts.shape)
    if triton_moe_supported(x, gate_up, down, rows=n * k):
        return triton_moe_routed(x, weights, experts, gate_up, down)
    order, offsets = group_by_expert(experts, gate_up.shape[0])
    rows = moe_experts_impl(x[order // k], offsets, gate_up, down)
    return combine(rows, order, weights)


# On CUDA, SparseMoE's whole expert part after the top-k: opaque, [N, H] out.
moe_routed = torch.library.custom_op("kiln::moe_routed", moe_routed_impl, mutates_args=())


@moe_routed.register_fake
def _(x, weights, experts, gate_up, down):
    return x.new_empty(x.shape[0], down.shape[1])


register_eager_impl(torch.ops.kiln.moe_routed, moe_routed_impl)
