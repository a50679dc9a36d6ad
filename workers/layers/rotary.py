"""Rotary position embedding (rotate-half form) as a `CustomOp` over a precomputed cos/sin table:
opaque `kiln::rotary_embedding` or native torch code, both through `rotary_ref`."""

from __future__ import annotations

import torch

from kiln.workers.layers.custom_op import CustomOp


def rotary_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> torch.Tensor:
    # x: [N, heads, D], positions: [N], cos_sin: [max_pos, D] = cat(cos [D/2], sin [D/2])
    half = x.shape[-1] // 2
    cs = cos_sin[positions].unsqueeze(1)  # [N, 1, D]
    cos, sin = cs[..., :half].to(x.dtype), cs[..., half:].to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.library.custom_op("kiln::rotary_embedding", mutates_args=())
def _rotary_op(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary_ref(q, positions, cos_sin), rotary_ref(k, positions, cos_sin)


@_rotary_op.register_fake
def _(q, k, positions, cos_sin):
    return torch.empty_like(q), torch.empty_like(k)


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
