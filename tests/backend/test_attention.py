"""kiln::attention against a per-token reference, for prefill, decode and mixed batches."""

from __future__ import annotations

import torch

import kiln.workers.layers.attention  # noqa: F401  (registers kiln::attention)


def reference(q, k, v, k_cache, v_cache, seq_ids, positions, scale):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for i in range(q.shape[0]):
        k_cache[seq_ids[i], positions[i]] = k[i]
        v_cache[seq_ids[i], positions[i]] = v[i]
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for i in range(q.shape[0]):
        s, p = seq_ids[i], positions[i]
        keys, values = k_cache[s, : p + 1], v_cache[s, : p + 1]  # [p+1, Hkv, D]
        for h in range(q.shape[1]):
            w = torch.softmax((keys[:, h // group] @ q[i, h]) * scale, dim=0)
            out[i, h] = w @ values[:, h // group]
    return out, k_cache, v_cache


def test_prefill_then_mixed_batch_matches_reference():
    torch.manual_seed(0)
    hq, hkv, d, slots, max_len = 4, 2, 8, 3, 16
    k_cache = torch.zeros(slots, max_len, hkv, d)
    v_cache = torch.zeros_like(k_cache)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    batches = [
        (torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1])),   # two prefills
        (torch.tensor([0, 1, 2, 2]), torch.tensor([3, 2, 0, 1])),         # decode + a new prefill
        (torch.tensor([2]), torch.tensor([2])),                             # one decode step
    ]
    for seq_ids, positions in batches:
        n = seq_ids.numel()
        q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
        got = torch.ops.kiln.attention(q, k, v, k_cache, v_cache, seq_ids, positions, d**-0.5)
        want, ref_k, ref_v = reference(q, k, v, ref_k, ref_v, seq_ids, positions, d**-0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k_cache, ref_k)
        torch.testing.assert_close(v_cache, ref_v)
