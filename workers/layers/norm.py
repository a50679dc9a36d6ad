"""RMSNorm: a `CustomOp` whose custom path is the opaque `kiln::rms_norm` op and whose native path
is the same maths in torch ops (Inductor fuses it); both call `rms_norm_ref`, so they cannot drift."""

from __future__ import annotations

import torch
from torch import nn

from kiln.workers.layers.custom_op import CustomOp


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: [N, H], weight: [H]; computed in float32 for stability, returned in x's dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


@torch.library.custom_op("kiln::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_ref(x, weight, eps)


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


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
