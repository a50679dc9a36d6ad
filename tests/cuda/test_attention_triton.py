"""kiln::attention's Triton path on a GPU against the per-token reference (run: pytest -m cuda)."""

from __future__ import annotations

import pytest
import torch

import kiln.workers.layers.attention  # noqa: F401  (registers kiln::attention)
from kiln.workers.layers.attention_triton import triton_attention_supported

pytestmark = pytest.mark.cuda


def _reference(q, k, v, k_cache, v_cache, seq_ids, positions, scale):
    """Per token, in float32: write its k/v, then attend to its sequence's positions 0..p."""
    k_cache, v_cache = k_cache.float().clone(), v_cache.float().clone()
    k_cache[seq_ids, positions] = k.float()
    v_cache[seq_ids, positions] = v.float()
    group = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(q.shape[0]):
        s, p = int(seq_ids[i]), int(positions[i])
        keys = k_cache[s, : p + 1].repeat_interleave(group, dim=1)  # [p+1, Hq, D]
        values = v_cache[s, : p + 1].repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,phd->hp", q[i].float(), keys) * scale, dim=-1)
        out[i] = torch.einsum("hp,phd->hd", w, values)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (8, 8, 64), (4, 1, 128)])
def test_triton_path_matches_reference_for_prefill_decode_and_mixed(dtype, hq, hkv, d):
    torch.manual_seed(0)
    slots, max_len = 4, 200
    k_cache = torch.zeros(slots, max_len, hkv, d, dtype=dtype, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    assert triton_attention_supported(torch.empty(1, hq, d, dtype=dtype, device="cuda"), k_cache)
    batches = [  # a long prefill (several position blocks), then decode + a new prefill, then decode
        (torch.tensor([0] * 150 + [1] * 3), torch.cat([torch.arange(150), torch.arange(3)])),
        (torch.tensor([0, 1, 2, 2, 2]), torch.tensor([150, 3, 0, 1, 2])),
        (torch.tensor([0, 1, 2]), torch.tensor([151, 4, 3])),
    ]
    tol = {torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]
    for seq_ids, positions in batches:
        seq_ids, positions = seq_ids.cuda(), positions.cuda()
        n = seq_ids.numel()
        q = torch.randn(n, hq, d, dtype=dtype, device="cuda")
        k, v = torch.randn(n, hkv, d, dtype=dtype, device="cuda"), torch.randn(n, hkv, d, dtype=dtype, device="cuda")
        want = _reference(q, k, v, k_cache, v_cache, seq_ids, positions, d**-0.5)
        got = torch.ops.kiln.attention(q, k, v, k_cache, v_cache, seq_ids, positions, d**-0.5)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        # The new k/v landed where they belong.
        torch.testing.assert_close(k_cache[seq_ids, positions], k)
        torch.testing.assert_close(v_cache[seq_ids, positions], v)


def test_triton_path_is_capturable_in_a_cuda_graph():
    torch.manual_seed(0)
    hq, hkv, d = 8, 2, 64
    k_cache = torch.zeros(2, 64, hkv, d, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    q, k, v = (torch.randn(2, h, d, device="cuda") for h in (hq, hkv, hkv))
    seq_ids, positions = torch.tensor([0, 1], device="cuda"), torch.tensor([5, 9], device="cuda")
    torch.ops.kiln.attention(q, k, v, k_cache, v_cache, seq_ids, positions, 0.125)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.kiln.attention(q, k, v, k_cache, v_cache, seq_ids, positions, 0.125)
    positions.copy_(torch.tensor([20, 40], device="cuda"))  # the graph reads bounds from memory
    graph.replay()
    torch.cuda.synchronize()
    want = _reference(q, k, v, k_cache, v_cache, seq_ids, positions, 0.125)
    torch.testing.assert_close(out, want, rtol=2e-3, atol=2e-3)
