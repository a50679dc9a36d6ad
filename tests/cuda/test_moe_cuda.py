"""kiln::moe_experts' grouped-matmul path on a GPU (bf16, sm90/sm100) against the reference loop,
and a MoE layer's decode step captured in a CUDA graph (run: pytest -m cuda)."""

from __future__ import annotations

import pytest
import torch

from kiln.workers import torch_internals
from kiln.workers.layers.moe import ExpertWeights, SparseMoE, group_by_expert
from kiln.workers.layers.moe_experts import experts_loop, grouped_path, moe_experts_impl
from kiln.workers.layers.moe_triton import MAX_ROWS_ENV

pytestmark = pytest.mark.cuda


def _needs_fast_grouped_mm() -> None:
    x = torch.empty(1, dtype=torch.bfloat16, device="cuda")
    if not torch_internals.grouped_mm_fast(x):
        pytest.skip(f"torch's grouped matmul has no sync-free kernel on sm{torch.cuda.get_device_capability()}")


@pytest.mark.parametrize("tokens, experts, top_k", [(1, 128, 8), (8, 128, 8), (64, 128, 8), (5, 8, 2)])
def test_grouped_path_matches_the_loop(tokens, experts, top_k, monkeypatch):
    _needs_fast_grouped_mm()
    monkeypatch.setenv(MAX_ROWS_ENV, "0")  # the grouped matmuls even for few rows (not the Triton path)
    torch.manual_seed(0)
    hidden, inter = 256, 96
    gate_up = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden**-0.5
    down = torch.randn(experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * inter**-0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    chosen = torch.stack([torch.randperm(experts, device="cuda")[:top_k] for _ in range(tokens)])
    order, offsets = group_by_expert(chosen, experts)
    rows = x[order // top_k]
    assert grouped_path(rows, gate_up, down)
    got = moe_experts_impl(rows, offsets, gate_up, down)
    want = experts_loop(rows, offsets, gate_up, down)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("max_rows", ["0", ""], ids=["grouped", "triton"])
def test_moe_decode_step_is_captured_in_a_cuda_graph(max_rows, monkeypatch):
    """No host sync anywhere in the layer: it captures, and replays on new routing (through the
    grouped matmuls, and through the Triton kernels: 8 tokens × top-4 is within their rows)."""
    _needs_fast_grouped_mm()
    monkeypatch.setenv(MAX_ROWS_ENV, max_rows)
    torch.manual_seed(0)
    hidden, inter, experts, top_k, n = 256, 96, 16, 4, 8
    moe = SparseMoE(hidden, inter, experts, top_k, softmax_first=True, renormalize=True,
                    weights=ExpertWeights.fused_layout("mlp"), dtype=torch.bfloat16, device=torch.device("cuda"))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x)  # first-call set-up (device capability, kernels) outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe(x)
        for _ in range(3):  # new inputs, new routing, same graph
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out.float(), moe(x).float(), rtol=1e-2, atol=1e-2)


def test_loop_path_refuses_capture_clearly():
    """float32 has no sync-free grouped matmul: capturing it is an error that says what captures."""
    x = torch.randn(4, 16, device="cuda")
    gate_up, down = torch.randn(2, 16, 16, device="cuda"), torch.randn(2, 16, 8, device="cuda")
    offsets = torch.tensor([2, 4], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="captured in a CUDA graph only through its Triton kernels"):
        with torch.cuda.graph(graph):
            moe_experts_impl(x, offsets, gate_up, down)
