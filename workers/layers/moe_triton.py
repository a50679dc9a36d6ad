"""The decode path of kiln's MoE experts: two Triton kernels that read each row's expert weights
directly (a gathered GEMV), for the few rows of a decode step; in two forms, one per op.

torch's grouped matmul (moe_experts.py) is built for large groups: at batch 1 a Qwen3-30B-A3B
layer has 8 rows spread over 8 of 128 experts, and each grouped GEMM pads every row to a whole
tile and runs as its own kernel, with the SiLU-mul a third one between them. Here:

    x:       [M, K]      rows sorted by expert (K = hidden)
    offsets: [E] int32   cumulative row counts (expert e owns rows offsets[e-1]..offsets[e])
    gate_up: [E, 2I, K]  gate rows 0..I, then up rows I..2I (K contiguous: as stored)
    down:    [E, H, I]   (H = K; I contiguous)

    1. _gate_up_silu_kernel, grid (M, I / BLOCK_N): program (m, j) finds row m's expert e from
       `offsets` (the count of offsets <= m, on the device), reads gate_up[e, j-th block of gate
       rows, :] and the matching up rows, and writes a[m, block] = silu(gate·x[m]) * (up·x[m])
       in float32 (fp32 accumulation over K; a never rounds to bf16, unlike the grouped path).
    2. _down_kernel, grid (M, H / BLOCK_H): out[m, block] = down[e, block, :] · a[m], stored in
       x's dtype.
That is `triton_moe_experts` (kiln::moe_experts: rows already sorted). `triton_moe_routed`
(kiln::moe_routed, what SparseMoE calls on CUDA) skips the sort and the weighted sum around it:

    x: [N, K] tokens   experts: [N, k] int64 and weights: [N, k] float32 (the router's top-k)
    1. the same kernel over the N·k pairs unsorted: pair p reads token p // k and expert
       experts.flat[p] (given, not searched);
    2. _down_kernel, grid (N·k, H / BLOCK_H): per pair p, weights.flat[p] ·
       down[experts.flat[p], block, :] · a[p] in float32; then the sum over each token's k pairs
       (one small reduction, float32, deterministic: no atomics), stored in x's dtype. (The
       kernel can also sum a token's k pairs in registers, one program per token and block, but
       at batch 1 that leaves too few programs to fill the GPU.)

Only rows that exist launch programs (no work for empty experts), programs of the same output
block and consecutive rows — rows of the same expert — run side by side, so an expert chosen by
several tokens is read from HBM about once and from L2 after. Every size comes from the shapes
and the loop bounds are constants: nothing reads back to the host, and the launches are captured
in a CUDA graph (the kernels compile on the first, uncaptured call: kiln's warm-up runs).

Triton is imported lazily: on a CPU build (or a torch without Triton) this module imports and
`triton_moe_supported` says False; only a launch needs CUDA.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none and use the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

DEFAULT_MAX_ROWS = 128
"""Token-expert pairs (tokens × top-k) up to which the Triton path runs; above, torch's grouped
matmul. 128 is batch 16 at top-8. Measured on an H200 (`benchmarks/moe_decode.py --part op`,
one Qwen3-30B-A3B layer's experts, weights out of L2, per-pair down kernel): Triton 26/137/246/408
us against grouped 53/209/317/385 us at 8/64/128/256 pairs: a pair here reads its expert's
weights by itself, which wins while pairs are few; from ~256 pairs every expert serves several
and the grouped GEMM's tiles reuse its weights."""
MAX_ROWS_ENV = "KILN_MOE_TRITON_MAX_ROWS"
"""Overrides DEFAULT_MAX_ROWS (0 turns the Triton path off): read at each call, outside any trace."""
BLOCKS_ENV = "KILN_MOE_TRITON_BLOCKS"
"""Overrides block_sizes(): four comma-separated powers of two (for the benchmark's sweep)."""
DTYPES = (torch.bfloat16, torch.float16)


def max_rows() -> int:
    value = os.environ.get(MAX_ROWS_ENV)
    return DEFAULT_MAX_ROWS if value in (None, "") else int(value)


def choose_triton(device_type: str, dtype: torch.dtype, weight_dtype: torch.dtype, rows: int,
                  triton_available: bool, limit: int) -> bool:
    """The dispatch rule, on plain values: CUDA, Triton importable, bf16/fp16 rows and weights of
    the same dtype, and at most `limit` rows (0 rows: nothing to launch, either path will do)."""
    return (device_type == "cuda" and triton_available and dtype in DTYPES and weight_dtype == dtype
            and 0 < rows <= limit)


def triton_moe_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, rows: int | None = None) -> bool:
    """Whether the Triton path runs for these tensors and `rows` token-expert pairs (default: x's
    rows), DEFAULT_MAX_ROWS or $KILN_MOE_TRITON_MAX_ROWS at most; also needs contiguous last
    dimensions."""
    rows = x.shape[0] if rows is None else rows
    if not choose_triton(x.device.type, x.dtype, gate_up.dtype if gate_up.dtype == down.dtype else None,
                         rows, triton is not None, max_rows()):
        return False
    return x.stride(-1) == 1 and gate_up.stride(-1) == 1 and down.stride(-1) == 1


def block_sizes(rows: int, inter: int, hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K of the gate/up kernel, BLOCK_H, BLOCK_I of the down kernel): small output
    blocks so that a handful of rows still spreads over every multiprocessor (batch 1: 8 pairs ×
    768/16 = 384 gate/up programs, 2048/16 = 128 down programs, each loading its token's 8
    experts at once, on 132 SMs), wide K blocks so that each program has few, long steps."""
    value = os.environ.get(BLOCKS_ENV)
    if value:
        sizes = tuple(int(v) for v in value.split(","))
        assert len(sizes) == 4 and all(s > 0 and s & (s - 1) == 0 for s in sizes), f"{BLOCKS_ENV}={value!r}"
        return sizes  # type: ignore[return-value]
    return 16, 256, 16, 128


if triton is not None:

    @triton.jit
    def _expert_of(ids_ptr, p, FROM_OFFSETS: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr):
        """Pair/row p's expert: ids_ptr[p] (routed), or with FROM_OFFSETS (sorted rows) how many
        cumulative counts in ids_ptr[0..E) are <= p. Clamped to 0..E-1 so that malformed
        routing cannot index past the weights."""
        if FROM_OFFSETS:
            e = tl.arange(0, E_PAD)
            ends = tl.load(ids_ptr + e, mask=e < E, other=2**30)
            expert = tl.sum((ends <= p).to(tl.int32), axis=0)
        else:
            expert = tl.load(ids_ptr + p).to(tl.int32)
        return tl.minimum(tl.maximum(expert, 0), E - 1).to(tl.int64)

    @triton.jit
    def _gate_up_silu_kernel(
        x_ptr, ids_ptr, w_ptr, a_ptr,
        stride_xm, stride_we, stride_wn, stride_am,
        K: tl.constexpr, I: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
        FROM_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # a[p, cols] = silu(gate_e · x[p // TOP_K]) * (up_e · x[p // TOP_K]), e = row p's expert
        p = tl.program_id(0)
        block = tl.program_id(1)
        expert = _expert_of(ids_ptr, p, FROM_OFFSETS, E, E_PAD)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] of this expert's I
        col_ok = cols < I
        ks = tl.arange(0, BLOCK_K)
        gate_rows = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
        up_rows = gate_rows + I * stride_wn
        x_row = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm
        acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            xk = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_K]
            w_ok = col_ok[:, None] & k_ok[None, :]
            g = tl.load(gate_rows + k[None, :], mask=w_ok, other=0.0)  # [BLOCK_N, BLOCK_K]
            u = tl.load(up_rows + k[None, :], mask=w_ok, other=0.0)
            acc_gate += g.to(tl.float32) * xk
            acc_up += u.to(tl.float32) * xk
        gate = tl.sum(acc_gate, axis=1)  # [BLOCK_N]
        up = tl.sum(acc_up, axis=1)
        a = gate / (1.0 + tl.exp(-gate)) * up  # silu(gate) * up
        tl.store(a_ptr + p.to(tl.int64) * stride_am + cols, a, mask=col_ok)

    @triton.jit
    def _down_kernel(
        a_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr,
        stride_am, stride_we, stride_wh, stride_om,
        I: tl.constexpr, H: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, TOP_K: tl.constexpr,
        TOP_K_PAD: tl.constexpr, FROM_OFFSETS: tl.constexpr, WEIGHTED: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        # out[r, hs] = Σ_{j < TOP_K} weight[p] · down_e[hs, :] · a[p], p = r·TOP_K + j, e = p's expert.
        # The k experts' tiles are one [TOP_K_PAD, BLOCK_H, BLOCK_I] load per step, so a token's
        # k weight reads are in flight together (a loop over j would serialize them).
        r = tl.program_id(0)
        block = tl.program_id(1)
        hs = block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] output columns
        h_ok = hs < H
        slots = tl.arange(0, TOP_K_PAD)
        slot_ok = slots < TOP_K
        ps = r * TOP_K + slots  # [TOP_K_PAD] this output row's pairs
        if FROM_OFFSETS:  # sorted rows: count the cumulative ends <= p
            e = tl.arange(0, E_PAD)
            ends = tl.load(ids_ptr + e, mask=e < E, other=2**30)
            experts = tl.sum((ends[None, :] <= ps[:, None]).to(tl.int32), axis=1)
        else:
            experts = tl.load(ids_ptr + ps, mask=slot_ok, other=0).to(tl.int32)
        experts = tl.minimum(tl.maximum(experts, 0), E - 1).to(tl.int64)  # [TOP_K_PAD]
        if WEIGHTED:
            weight = tl.load(weights_ptr + ps, mask=slot_ok, other=0.0).to(tl.float32)
        else:
            weight = tl.where(slot_ok, 1.0, 0.0)
        js = tl.arange(0, BLOCK_I)
        w_rows = (w_ptr + experts[:, None, None] * stride_we
                  + hs[None, :, None].to(tl.int64) * stride_wh)  # [TOP_K_PAD, BLOCK_H, 1]
        a_rows = a_ptr + ps[:, None].to(tl.int64) * stride_am  # [TOP_K_PAD, 1]
        row_ok = slot_ok[:, None, None] & h_ok[None, :, None]
        acc = tl.zeros([BLOCK_H, BLOCK_I], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            i = i0 + js
            i_ok = i < I
            ai = tl.load(a_rows + i[None, :], mask=slot_ok[:, None] & i_ok[None, :], other=0.0)  # [KP, BI] fp32
            ai = ai * weight[:, None]
            w = tl.load(w_rows + i[None, None, :], mask=row_ok & i_ok[None, None, :], other=0.0)  # [KP, BH, BI]
            acc += tl.sum(w.to(tl.float32) * ai[:, None, :], axis=0)
        out = tl.sum(acc, axis=1)  # [BLOCK_H]
        tl.store(out_ptr + r.to(tl.int64) * stride_om + hs, out.to(out_ptr.dtype.element_ty), mask=h_ok)


def _launch(x, ids, weights, gate_up, down, top_k: int, from_offsets: bool) -> torch.Tensor:
    """Both kernels: x [T, K] (T tokens, or rows when top_k == 1), ids/weights per pair; [T, H]."""
    t, k = x.shape
    e, two_i, k_w = gate_up.shape
    inter = two_i // 2
    assert k_w == k and down.shape == (e, k, inter), (x.shape, gate_up.shape, down.shape)
    assert x.stride(-1) == gate_up.stride(-1) == down.stride(-1) == 1, "needs contiguous last dimensions"
    out = x.new_empty(t, k)  # [T, H]
    pairs = t * top_k
    if pairs == 0:
        return out
    a = torch.empty(pairs, inter, device=x.device, dtype=torch.float32)  # [T·k, I]: silu(gate) * up
    block_n, block_k, block_h, block_i = block_sizes(pairs, inter, k)
    e_pad = triton.next_power_of_2(e)
    _gate_up_silu_kernel[(pairs, triton.cdiv(inter, block_n))](
        x, ids, gate_up, a,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), a.stride(0),
        K=k, I=inter, E=e, E_PAD=e_pad, TOP_K=top_k, FROM_OFFSETS=from_offsets,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    # One down program per pair and output block, each pair's weighted output kept in float32,
    # then the sum over the k pairs of a token: a program per token and block (k tiles in one
    # load) leaves too few programs to fill the GPU at batch 1 (2048/16 = 128 on 132 SMs, each
    # with k = 8 serial steps) and measured 63 us a layer against 26 us this way (H200).
    per_pair = out if top_k == 1 else torch.empty(pairs, k, device=x.device, dtype=torch.float32)  # [T·k, H]
    _down_kernel[(pairs, triton.cdiv(k, block_h))](
        a, ids, weights if weights is not None else a, down, per_pair,
        a.stride(0), down.stride(0), down.stride(1), per_pair.stride(0),
        I=inter, H=k, E=e, E_PAD=e_pad, TOP_K=1, TOP_K_PAD=1,
        FROM_OFFSETS=from_offsets, WEIGHTED=weights is not None, BLOCK_H=block_h, BLOCK_I=block_i,
        num_warps=4,
    )
    if top_k == 1:
        return out
    return per_pair.view(t, top_k, k).sum(dim=1).to(x.dtype)  # [T, H], summed in float32


def triton_moe_experts(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """kiln::moe_experts' rows: [M, H], row m through its expert's MLP (rows sorted by expert,
    `offsets` [E] int32 cumulative). Two launches, no host sync."""
    assert triton is not None, "Triton is not installed"
    assert offsets.shape == (gate_up.shape[0],), (offsets.shape, gate_up.shape)
    return _launch(x, offsets, None, gate_up, down, 1, True)


def triton_moe_routed(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, gate_up: torch.Tensor,
                      down: torch.Tensor) -> torch.Tensor:
    """kiln::moe_routed: [N, H] = Σ_j weights[n, j] · MLP_{experts[n, j]}(x[n]), unsorted pairs,
    the weighted sum in float32 (module docstring). Two launches, no host sync."""
    assert triton is not None, "Triton is not installed"
    assert experts.shape == weights.shape == (x.shape[0], experts.shape[1]), (x.shape, experts.shape, weights.shape)
    return _launch(x, experts.contiguous(), weights.contiguous(), gate_up, down, experts.shape[1], False)
