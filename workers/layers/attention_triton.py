"""The CUDA path of `kiln::attention`: one Triton kernel that reads each token's own prefix of the
KV cache in place.

The torch path (attention.py) gathers every token's whole cache row, `k_cache[seq_ids]`
([N, max_len, Hkv, D], written out and read back), then masks: at batch 64 and a cache of 512
positions that is ~4 GB of traffic per decode step of an 8B model, more than the weights.
Here one program per (token, kv head) walks the cache of the token's sequence from position 0
to the token's own position, with an online softmax, so a step reads only the keys and values
that are attended to. Prefill, decode and mixed batches are the same kernel: the new tokens'
k/v are written to the cache first (attention.py), so a prefill token sees its sequence's
earlier tokens of the same batch. Loop bounds come from device memory: nothing syncs with the
host, so the kernel can be captured in a CUDA graph.

    q: [N, Hq, D]   k_cache, v_cache: [slots, max_len, Hkv, D]   seq_ids, positions: [N] int64
    out: [N, Hq, D]
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none and use the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK_POSITIONS = 64
"""Cache positions one loop step of a program loads (keys and values)."""


def triton_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel handles these tensors: CUDA, Triton present, a power-of-two head dim of
    at least 16 (tl.arange and tl.dot need it), a contiguous last dimension."""
    d = q.shape[-1]
    return (triton is not None and q.is_cuda and k_cache.is_cuda and d >= 16 and d & (d - 1) == 0
            and q.stride(-1) == 1 and k_cache.stride(-1) == 1)


if triton is not None:

    @triton.jit
    def _prefix_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, seq_ptr, pos_ptr, scale,
        stride_qn, stride_qh, stride_on, stride_oh,
        stride_ks, stride_kp, stride_kh, stride_vs, stride_vp, stride_vh,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
    ):
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(seq_ptr + token)
        last = tl.load(pos_ptr + token)  # attends to positions 0..last of its sequence

        heads = tl.arange(0, GROUP_PAD)  # the GROUP query heads sharing this kv head (padded)
        dims = tl.arange(0, HEAD_DIM)
        head_ok = heads < GROUP
        q_rows = q_ptr + token * stride_qn + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
        q = tl.load(q_rows, mask=head_ok[:, None], other=0.0)  # [GROUP_PAD, D]

        m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max
        denom = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
        v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
        for start in range(0, last + 1, BLOCK):
            positions = start + tl.arange(0, BLOCK)
            visible = positions <= last
            k = tl.load(k_base + positions[:, None] * stride_kp + dims[None, :], mask=visible[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale  # [GROUP_PAD, BLOCK], fp32
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            correction = tl.exp(m - m_new)
            denom = denom * correction + tl.sum(p, 1)
            v = tl.load(v_base + positions[:, None] * stride_vp + dims[None, :], mask=visible[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / denom[:, None]
        out_rows = out_ptr + token * stride_on + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, seq_ptr, pos_ptr,
        stride_kn, stride_kh, stride_vn, stride_vh,
        stride_ks, stride_kp, stride_kh_cache, stride_vs, stride_vp, stride_vh_cache,
        HEAD_DIM: tl.constexpr,
    ):
        token = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(seq_ptr + token)
        position = tl.load(pos_ptr + token)
        dims = tl.arange(0, HEAD_DIM)
        k = tl.load(k_ptr + token * stride_kn + head * stride_kh + dims)
        v = tl.load(v_ptr + token * stride_vn + head * stride_vh + dims)
        tl.store(k_cache_ptr + slot * stride_ks + position * stride_kp + head * stride_kh_cache + dims, k)
        tl.store(v_cache_ptr + slot * stride_vs + position * stride_vp + head * stride_vh_cache + dims, v)


def triton_write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """k_cache[seq_ids, positions] = k and the same for v, in one launch (two index_put kernels
    otherwise: measured 7 µs a layer on an H200). Where two tokens name the same (slot,
    position), which one lands is unspecified, as with index_put (only padding rows do that)."""
    assert triton is not None, "Triton is not installed"
    n, hkv, d = k.shape
    assert v.shape == k.shape and k_cache.shape[2:] == (hkv, d), (k.shape, k_cache.shape)
    if n == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a contiguous last dimension"
    _write_kv_kernel[(n, hkv)](
        k, v, k_cache, v_cache, seq_ids, positions,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=d, num_warps=1,
    )


def triton_prefix_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            seq_ids: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each token over its sequence's cache positions 0..position (the
    cache already holds the batch's own k/v). Shapes as in the module docstring."""
    assert triton is not None, "Triton is not installed"
    n, hq, d = q.shape
    hkv = k_cache.shape[2]
    assert hq % hkv == 0 and k_cache.shape[-1] == d and v_cache.shape == k_cache.shape, (q.shape, k_cache.shape)
    group = hq // hkv
    out = torch.empty_like(q)
    if n == 0:
        return out
    # tl.dot needs at least 16 rows: pad the query-head group (the extra rows are masked off).
    group_pad = max(16, triton.next_power_of_2(group))
    _prefix_attention_kernel[(n, hkv)](
        q, k_cache, v_cache, out, seq_ids, positions, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, BLOCK=BLOCK_POSITIONS,
        num_warps=4,
    )
    return out
