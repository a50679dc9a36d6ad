"""`kiln::attention`: causal attention over the current tokens plus a static KV cache.

One op serves prefill, decode and mixed batches because tokens come flattened, each with the
sequence slot it belongs to and its position in that sequence:

    q: [N, Hq, D]   k, v: [N, Hkv, D]   seq_ids, positions: [N] (int64)
    k_cache, v_cache: [num_slots, max_len, Hkv, D]   (written in place)
    out: [N, Hq, D]

The op first writes every token's k/v at (seq_ids[i], positions[i]), then lets token i attend
to the cached keys of its own sequence at positions 0..positions[i]. Shapes depend only on N,
and nothing synchronises with the host, so the op can be captured in a CUDA graph. It is
kiln's default splitting op: piecewise graphs stop before it and resume after it. On CUDA the
attention itself is a Triton kernel that reads the cache in place (attention_triton.py); the
torch code below is the reference, and the path on the CPU.
"""

from __future__ import annotations

import torch

from kiln.workers.layers.attention_triton import triton_attention_supported, triton_prefix_attention, triton_write_kv
from kiln.workers.layers.custom_op import register_eager_impl


def attention_impl(
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
    if triton_attention_supported(q, k_cache) and k.stride(-1) == 1 and v.stride(-1) == 1:
        # CUDA: write the new k/v in one launch, then read each token's own prefix of the cache
        # in place (attention_triton.py). Same stream: the write lands before the read.
        triton_write_kv(k, v, k_cache, v_cache, seq_ids, positions)
        return triton_prefix_attention(q, k_cache, v_cache, seq_ids, positions, scale)
    k_cache[seq_ids, positions] = k
    v_cache[seq_ids, positions] = v
    keys = k_cache[seq_ids].transpose(1, 2)  # [N, Hkv, L, D]
    values = v_cache[seq_ids].transpose(1, 2)  # [N, Hkv, L, D]
    visible = _cache_positions(keys.shape[2], q.device) <= positions[:, None]  # [N, L]
    # Each token is a batch of its own: its G = Hq/Hkv query heads per kv head attend to the
    # L cached positions of its sequence, masked to 0..position (few kernels: one fused SDPA).
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(n, hkv, hq // hkv, d), keys, values, attn_mask=visible[:, None, None, :], scale=scale)
    return out.reshape(n, hq, d)  # [N, Hq, D]


_POSITIONS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _cache_positions(max_len: int, device: torch.device) -> torch.Tensor:
    """arange(max_len) on `device`, made once (a kernel launch saved per layer and step)."""
    key = (max_len, device)
    if key not in _POSITIONS:
        _POSITIONS[key] = torch.arange(max_len, device=device)
    return _POSITIONS[key]


# The op Dynamo and Inductor see: opaque, with a fake implementation for tracing.
attention = torch.library.custom_op("kiln::attention", attention_impl, mutates_args=("k_cache", "v_cache"))


@attention.register_fake
def _(q, k, v, k_cache, v_cache, seq_ids, positions, scale):
    return torch.empty_like(q)


# Splitting pieces run eagerly, outside any tracing: there kiln calls the implementation
# directly, skipping the custom-op dispatch (tens of microseconds a call, per layer and step).
register_eager_impl(torch.ops.kiln.attention, attention_impl)
