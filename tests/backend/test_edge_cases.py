"""Edge cases of the backend: inputs trace-once must not freeze, 0-dim constants, empty batches,
Inductor options with another backend, and debug dumps."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from examples.toy_llama import build
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import building_with
from kiln.workers.runtime.kiln_model import KilnModel
from kiln.workers.compilation.trace_once import TraceOnce


def test_tensor_inside_a_list_is_never_frozen_as_a_constant():
    class SumOfList(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, xs: list[torch.Tensor]):
            return xs[0] * self.w

    model = SumOfList()
    fn = TraceOnce(model, lambda gm, example_inputs: gm.forward, dynamic_batch=False)
    fn([torch.ones(2, 3)])
    y = torch.randn(2, 3)
    # Bound directly, the list's tensor would have been held from the first call.
    torch.testing.assert_close(fn([y]), y * model.w)


def test_structural_hash_of_a_zero_dim_constant():
    from kiln.workers.compilation.structural_hash import structural_hash

    class WithScalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x):
            return x * self.scale

    gm = fx.symbolic_trace(WithScalar())
    other = fx.symbolic_trace(WithScalar())
    other.scale.fill_(3.0)
    x = torch.randn(4, 2)
    assert structural_hash(gm, [x], "h") != structural_hash(other, [x], "h")


def test_empty_batch_is_a_clear_error():
    config = CompilationConfig(level=0)
    with building_with(config):
        model = build()
    kiln = KilnModel(model, config)
    kiln.compile([1, 2])
    with pytest.raises(ValueError, match="0 tokens"):
        kiln(*model.example_inputs(0))


def test_inductor_options_with_another_backend_are_an_error():
    from kiln.workers.compilation.backend import compile_forward

    config = CompilationConfig(level=1, backend="eager", inductor_compile_config={"max_autotune": False})
    with pytest.raises(ValueError, match="inductor_compile_config.*apply to Inductor only"):
        compile_forward(torch.nn.Linear(2, 2), config)


def test_debug_dump_path_gets_the_graphs(tmp_path):
    config = CompilationConfig(use_inductor=False, debug_dump_path=str(tmp_path / "dump"))
    with building_with(config):
        model = build(layers=2)
    KilnModel(model, config, rank=1).compile([2])
    files = sorted(p.name for p in (tmp_path / "dump" / "rank_1").iterdir())
    assert files[-2:] == ["split_graph.py", "traced_graph.py"]
    pieces = [f for f in files if f.startswith("piece_")]
    assert len(pieces) == 5 and sum("_splitting" in f for f in pieces) == 2, files
    assert "kiln.attention" in (tmp_path / "dump" / "rank_1" / "piece_001_splitting.py").read_text()
