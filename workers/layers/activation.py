"""SiLU-and-mul (the gated MLP activation) as a `CustomOp`: opaque `kiln::silu_and_mul` or native
torch code, both through `silu_and_mul_ref`."""

from __future__ import annotations

import torch

from kiln.workers.layers.custom_op import CustomOp


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [N, 2I] -> [N, I]
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@torch.library.custom_op("kiln::silu_and_mul", mutates_args=())
def _silu_and_mul_op(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_ref(x)


@_silu_and_mul_op.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


class SiluAndMul(CustomOp):
    op_name = "silu_and_mul"

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul_ref(x)

    def forward_custom(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kiln.silu_and_mul(x)
