"""kiln's model building blocks: custom-op layers, attention, tensor-parallel state and collectives.

Importing this package registers kiln's torch ops (`kiln::attention`, `kiln::all_reduce`,
`kiln::rms_norm`, `kiln::silu_and_mul`, `kiln::rotary_embedding`).
"""

from kiln.workers.layers.activation import SiluAndMul
from kiln.workers.layers import attention  # noqa: F401  (the module: registers kiln::attention)
from kiln.workers.layers.collectives import all_reduce
from kiln.workers.layers.custom_op import CustomOp, building_with
from kiln.workers.layers.norm import RMSNorm
from kiln.workers.layers.rotary import RotaryEmbedding

__all__ = ["CustomOp", "RMSNorm", "RotaryEmbedding", "SiluAndMul", "all_reduce", "building_with"]
