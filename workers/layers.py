"""Layers with two implementations (see `CustomOp`): RMSNorm, SiLU-and-mul, rotary embedding.

The custom path calls a `kiln::` op that Inductor treats as an opaque kernel; the native path is
the same maths in torch ops, which Inductor fuses with its neighbours. Both share one reference
implementation (`*_ref`) so they cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.custom_ops import CustomOp

# ---------------------------------------------------------------------------------------------
# Reference maths, used by both paths


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [N, H], weight: [H]; computed in float32 for stability, returned in x's dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [N, 2I] -> [N, I]
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotary_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> torch.Tensor:
    # x: [N, heads, D], positions: [N], cos_sin: [max_pos, D] = cat(cos [D/2], sin [D/2])
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)  # [N, 1, D]
    cos, sin = cs[..., :half].to(x.dtype), cs[..., half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Opaque ops for the custom paths


@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("kiln::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


@_silu_and_mul_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


@torch.library.custom_op("kiln::rotary_embedding", mutates_args=())
def _rotary_op(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_ref(q, positions, cos_sin), rotary_ref(k, positions, cos_sin)


@_rotary_op.register_fake
def _(q, k, positions, cos_sin):
    return torch.empty_like(q), torch.empty_like(k)


# ---------------------------------------------------------------------------------------------
# Layers


class RMSNorm(CustomOp):
    op_name = "rms_norm"

    def __init__(self, hidden: int, eps: float = 1e-6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_ref(x, self.weight, self.eps)

    def forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.rms_norm(x, self.weight, self.eps)


class SiluAndMul(CustomOp):
    op_name = "silu_and_mul"

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_ref(x)

    def forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.silu_and_mul(x)


class RotaryEmbedding(CustomOp):
    """Rotary position embedding (rotate-half form) over a precomputed cos/sin table."""

    op_name = "rotary_embedding"

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0):
        super().__init__()
        assert head_dim % 2 == 0, head_dim
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: first half cos, second half sin
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward_native(self, q, k, positions):
        return rotary_ref(q, positions, self.cos_sin), rotary_ref(k, positions, self.cos_sin)

    def forward_custom(self, q, k, positions):
        return torch.ops.kiln.rotary_embedding(q, k, positions, self.cos_sin)
