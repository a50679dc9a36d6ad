"""`kiln::attention`: causal attention over the current tokens plus a static KV cache.

One op serves prefill, decode and mixed batches because tokens come flattened, each with the
sequence slot it belongs to and its position in that sequence:

    q: [N, Hq, D]   k, v: [N, Hkv, D]   seq_ids, positions: [N] (int64)
    k_cache, v_cache: [num_slots, max_len, Hkv, D]   (written in place)
    out: [N, Hq, D]

The op first writes every token's k/v at (seq_ids[i], positions[i]), then lets token i attend
to the cached keys of its own sequence at positions 0..positions[i]. Shapes depend only on N,
and nothing synchronises with the host, so the op can be captured in a CUDA graph. It is
kiln's default splitting op: piecewise graphs stop before it and resume after it.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("kiln::attention", mutates_args=("k_cache", "v_cache"))
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    n, hq, d = q.shape
    hkv = k.shape[1]
    k_cache[seq_ids, positions] = k
    v_cache[seq_ids, positions] = v
    keys = k_cache[seq_ids]  # [N, L, Hkv, D]
    values = v_cache[seq_ids]  # [N, L, Hkv, D]
    max_len = keys.shape[1]
    qg = q.view(n, hkv, hq // hkv, d).float()  # [N, Hkv, G, D]
    scores = torch.einsum("nkgd,nlkd->nkgl", qg, keys.float()) * scale  # [N, Hkv, G, L]
    visible = torch.arange(max_len, device=q.device)[None, :] <= positions[:, None]  # [N, L]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("nkgl,nlkd->nkgd", probs, values.float())  # [N, Hkv, G, D]
    return out.reshape(n, hq, d).to(q.dtype)


@attention.register_fake
def _(q, k, v, k_cache, v_cache, seq_ids, positions, scale):
    return torch.empty_like(q)
