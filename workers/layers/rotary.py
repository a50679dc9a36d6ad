"""Rotary position embedding (rotate-half form) as a `CustomOp` over a precomputed cos/sin table:
opaque `kiln::rotary_embedding` or native torch code, both through `rotary_ref`.

The table is computed once at build time, scaled frequencies included (`linear`, and Llama 3.x's
`llama3` scaling), so the traced graph only indexes it.
"""

from __future__ import annotations

import math
from typing import Any

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

    def __init__(self, head_dim: int, max_positions: int, base: float = 10000.0,
                 scaling: dict[str, Any] | None = None):
        super().__init__()
        assert head_dim % 2 == 0, head_dim
        inv_freq = scaled_inv_freq(1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim),
                                   scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        # [max_positions, head_dim]: first half cos, second half sin
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    def forward_native(self, q, k, positions):
        return rotary_ref(q, positions, self.cos_sin), rotary_ref(k, positions, self.cos_sin)

    def forward_custom(self, q, k, positions):
        return torch.ops.kiln.rotary_embedding(q, k, positions, self.cos_sin)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [D/2] after the checkpoint's rope scaling (Hugging Face's `rope_scaling`
    dict: `rope_type` "linear" or "llama3" and their factors); None leaves them as they are."""
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":  # positions divided by factor, i.e. every frequency too
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")
    # Llama 3.x: wavelengths longer than original_context / low_freq_factor are stretched by
    # `factor`, shorter than original_context / high_freq_factor kept, and those in between
    # interpolated linearly in original_context / wavelength.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    between = (wavelen >= context / high) & (wavelen <= context / low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    return torch.where(between, blended, stretched)
