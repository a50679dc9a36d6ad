"""The MoE Triton kernels (moe_triton.py) on a GPU: kiln::moe_experts' sorted-rows form and
kiln::moe_routed's unsorted-pairs form with the weighted sum fused, against the reference loop
(and the grouped matmuls): several token counts, top-k, dtypes, empty experts, odd sizes, the
dispatch at the row limit, and CUDA-graph captures replayed on new routing (run: pytest -m cuda)."""

from __future__ import annotations

import pytest
import torch

from kiln.workers import torch_internals
from kiln.workers.layers import moe_triton
from kiln.workers.layers.moe import combine, group_by_expert, route
from kiln.workers.layers.moe_experts import experts_grouped, experts_loop, moe_experts_impl, moe_routed_impl
from kiln.workers.layers.moe_triton import MAX_ROWS_ENV, triton_moe_experts, triton_moe_routed, triton_moe_supported

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def _needs_triton():
    if moe_triton.triton is None:
        pytest.skip("Triton is not installed")


def _weights(experts, hidden, inter, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)  # drawn on the GPU: the large shapes are ~1.2 GB
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, device="cuda", generator=gen) * inter**-0.5
    return gate_up.to(dtype), down.to(dtype)


def _rows(tokens, hidden, experts, top_k, dtype, seed=0, among=None):
    """x's rows grouped by expert for random distinct top-k choices (among the first `among` experts)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to("cuda", dtype)
    pool = among or experts
    chosen = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(tokens)]).cuda()
    order, offsets = group_by_expert(chosen, experts)
    return x[order // top_k], offsets


def _routing(tokens, hidden, experts, top_k, dtype, seed=0):
    """Tokens x [N, H] and the router's top-k: weights [N, k] float32, experts [N, k] int64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to("cuda", dtype)
    weights, chosen = route(torch.randn(tokens, experts, generator=gen).cuda(), top_k, True, True)
    return x, weights, chosen


def _routed_reference(x, weights, chosen, gate_up, down):
    """Sort, the loop in float32, the weighted sum: SparseMoE's CPU path."""
    order, offsets = group_by_expert(chosen, gate_up.shape[0])
    return combine(_reference(x[order // chosen.shape[1]], offsets, gate_up, down), order, weights)


def _reference(rows, offsets, gate_up, down):
    """The loop in float32 (the Triton path accumulates in float32 and keeps silu·up in float32)."""
    return experts_loop(rows.float(), offsets, gate_up.float(), down.float())


@pytest.mark.parametrize("tokens", [1, 2, 8, 33, 64])
@pytest.mark.parametrize("top_k", [8, 2])
def test_triton_path_matches_the_loop(tokens, top_k):
    experts, hidden, inter = 128, 256, 96
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    rows, offsets = _rows(tokens, hidden, experts, top_k, torch.bfloat16)
    got = triton_moe_experts(rows, offsets, gate_up, down)
    assert got.shape == (tokens * top_k, hidden) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _reference(rows, offsets, gate_up, down), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 8])
def test_triton_path_at_qwen3_30b_a3b_shapes_matches_the_grouped_matmuls(tokens):
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    rows, offsets = _rows(tokens, hidden, experts, top_k, torch.bfloat16)
    got = triton_moe_experts(rows, offsets, gate_up, down).float()
    torch.testing.assert_close(got, _reference(rows, offsets, gate_up, down), rtol=2e-2, atol=2e-2)
    if torch_internals.grouped_mm_fast(rows):
        torch.testing.assert_close(got, experts_grouped(rows, offsets, gate_up, down).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("tokens", [1, 2, 8, 33, 64])
@pytest.mark.parametrize("top_k", [8, 2, 1])
def test_routed_triton_path_matches_sort_loop_and_sum(tokens, top_k):
    experts, hidden, inter = 128, 256, 96
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    x, weights, chosen = _routing(tokens, hidden, experts, top_k, torch.bfloat16)
    got = triton_moe_routed(x, weights, chosen, gate_up, down)
    assert got.shape == (tokens, hidden) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), _routed_reference(x, weights, chosen, gate_up, down),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_routed_op_both_paths_at_qwen3_30b_a3b_shapes(tokens, monkeypatch):
    """kiln::moe_routed through Triton (within the row limit) and through sort + grouped matmuls +
    weighted sum (limit 0) agree with each other and with the reference."""
    experts, hidden, inter, top_k = 128, 2048, 768, 8
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    x, weights, chosen = _routing(tokens, hidden, experts, top_k, torch.bfloat16)
    want = _routed_reference(x, weights, chosen, gate_up, down)
    monkeypatch.setenv(MAX_ROWS_ENV, str(10**6))
    fast = moe_routed_impl(x, weights, chosen, gate_up, down).float()
    torch.testing.assert_close(fast, want, rtol=2e-2, atol=2e-2)
    if torch_internals.grouped_mm_fast(x):
        monkeypatch.setenv(MAX_ROWS_ENV, "0")
        grouped = moe_routed_impl(x, weights, chosen, gate_up, down).float()
        torch.testing.assert_close(grouped, want, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(fast, grouped, rtol=3e-2, atol=3e-2)


def test_empty_experts_first_last_and_between():
    """All rows on experts 0..3 of 16 (12 empty experts after them), and on experts 12..15 only
    (leading offsets are 0): each row still finds its expert."""
    experts, hidden, inter, tokens, top_k = 16, 128, 64, 6, 2
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    for shift in (0, 12):
        gen = torch.Generator().manual_seed(shift)
        x = torch.randn(tokens, hidden, generator=gen).to("cuda", torch.bfloat16)
        chosen = torch.stack([torch.randperm(4, generator=gen)[:top_k] for _ in range(tokens)]).cuda() + shift
        order, offsets = group_by_expert(chosen, experts)
        rows = x[order // top_k]
        got = triton_moe_experts(rows, offsets, gate_up, down)
        torch.testing.assert_close(got.float(), _reference(rows, offsets, gate_up, down), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_odd_sizes_and_float16(dtype):
    """Hidden and intermediate sizes that are no multiple of any block (masked tails)."""
    experts, hidden, inter, tokens, top_k = 10, 136, 40, 5, 3
    gate_up, down = _weights(experts, hidden, inter, dtype)
    rows, offsets = _rows(tokens, hidden, experts, top_k, dtype)
    got = triton_moe_experts(rows, offsets, gate_up, down)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), _reference(rows, offsets, gate_up, down), rtol=2e-2, atol=2e-2)


def test_dispatch_takes_triton_up_to_the_row_limit(monkeypatch):
    experts, hidden, inter = 8, 64, 32
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    monkeypatch.delenv(MAX_ROWS_ENV, raising=False)
    limit = moe_triton.DEFAULT_MAX_ROWS
    few = torch.empty(limit, hidden, device="cuda", dtype=torch.bfloat16)
    many = torch.empty(limit + 1, hidden, device="cuda", dtype=torch.bfloat16)
    assert triton_moe_supported(few, gate_up, down) and not triton_moe_supported(many, gate_up, down)
    assert not triton_moe_supported(few.float(), gate_up.float(), down.float())
    monkeypatch.setenv(MAX_ROWS_ENV, "0")
    assert not triton_moe_supported(few, gate_up, down)
    # kiln::moe_routed counts pairs (tokens × top-k), not tokens
    monkeypatch.delenv(MAX_ROWS_ENV)
    assert triton_moe_supported(few[: limit // 8], gate_up, down, rows=limit)
    assert not triton_moe_supported(few[: limit // 8], gate_up, down, rows=limit + 8)
    # and both ops' results through the dispatch are the Triton kernels' (bit for bit)
    rows, offsets = _rows(4, hidden, experts, 2, torch.bfloat16)
    torch.testing.assert_close(moe_experts_impl(rows, offsets, gate_up, down),
                               triton_moe_experts(rows, offsets, gate_up, down), rtol=0, atol=0)
    x, weights, chosen = _routing(4, hidden, experts, 2, torch.bfloat16)
    torch.testing.assert_close(moe_routed_impl(x, weights, chosen, gate_up, down),
                               triton_moe_routed(x, weights, chosen, gate_up, down), rtol=0, atol=0)


def test_captured_in_a_cuda_graph_and_replayed_on_new_routing():
    """Static buffers in, the op captured once; new rows and new offsets copied in, replay = eager."""
    experts, hidden, inter, tokens, top_k = 128, 512, 128, 8, 8
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    rows, offsets = _rows(tokens, hidden, experts, top_k, torch.bfloat16)
    static_rows, static_offsets = rows.clone(), offsets.clone()
    triton_moe_experts(static_rows, static_offsets, gate_up, down)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts_impl(static_rows, static_offsets, gate_up, down)
    for seed in (1, 2, 3):
        new_rows, new_offsets = _rows(tokens, hidden, experts, top_k, torch.bfloat16, seed=seed, among=16 * seed)
        static_rows.copy_(new_rows)
        static_offsets.copy_(new_offsets)
        graph.replay()
        torch.testing.assert_close(out, triton_moe_experts(new_rows, new_offsets, gate_up, down), rtol=0, atol=0)
        torch.testing.assert_close(out.float(), _reference(new_rows, new_offsets, gate_up, down),
                                   rtol=2e-2, atol=2e-2)


def test_routed_op_captured_in_a_cuda_graph_and_replayed_on_new_routing():
    experts, hidden, inter, tokens, top_k = 128, 512, 128, 8, 8
    gate_up, down = _weights(experts, hidden, inter, torch.bfloat16)
    static = [t.clone() for t in _routing(tokens, hidden, experts, top_k, torch.bfloat16)]
    moe_routed_impl(*static, gate_up, down)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_routed_impl(*static, gate_up, down)
    for seed in (1, 2, 3):
        new = _routing(tokens, hidden, experts, top_k, torch.bfloat16, seed=seed)
        for buffer, value in zip(static, new):
            buffer.copy_(value)
        graph.replay()
        torch.testing.assert_close(out, triton_moe_routed(*new, gate_up, down), rtol=0, atol=0)
        torch.testing.assert_close(out.float(), _routed_reference(*new, gate_up, down), rtol=2e-2, atol=2e-2)
