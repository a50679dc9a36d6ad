"""kiln.compile and torch.compile(backend="kiln") on an unmodified transformers Llama.

The default splitting ops split it at torch's scaled_dot_product_attention: L layers give
2L+1 pieces of which 3 are distinct (embedding + first layer's start, the identical layer
joins, last layer's end + head), so the Inductor compiles do not grow with depth, a new batch
size compiles nothing (the batch dimension is symbolic and calls bypass Dynamo), and a warm
process loads every piece.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kiln
from kiln import CompilationConfig
from tests.backend.conftest import run_child
from tests.backend.hf_llama import tiny_llama, token_batch

import transformers  # noqa: E402,F401  (a test dependency: an import error must fail, not skip)

CHILD = Path(__file__).with_name("hf_compile_child.py")


def eager_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def two_layers(module_tmp):
    """A 2-layer Llama compiled cold into its own root, called at batch 3."""
    root = module_tmp / "two_layers"
    model = tiny_llama(2)
    compiled = kiln.compile(model, cache_root=root)
    out = compiled(token_batch(3), use_cache=False)
    return model, compiled, root, out


def test_two_layers_split_at_sdpa_three_compiles_and_eager_outputs(two_layers):
    model, compiled, _, out = two_layers
    from transformers.modeling_outputs import CausalLMOutputWithPast

    assert isinstance(out, CausalLMOutputWithPast)  # what the module returns
    record = compiled.record
    assert (record.pieces_total, record.pieces_splitting) == (5, 2)
    assert record.unique_pieces == 3 and record.inductor_compiles == 3 and record.cache_misses == 3
    torch.testing.assert_close(out.logits, eager_logits(model, token_batch(3)), rtol=1e-5, atol=1e-5)


def test_new_batch_sizes_and_call_styles_compile_nothing(two_layers):
    model, compiled, _, _ = two_layers
    for batch in (1, 5, 2):
        ids = token_batch(batch)
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager_logits(model, ids),
                                   rtol=1e-5, atol=1e-5)
    ids = token_batch(4)
    by_keyword = compiled(input_ids=ids, use_cache=False).logits  # same graph, bound by name
    torch.testing.assert_close(by_keyword, eager_logits(model, ids), rtol=1e-5, atol=1e-5)
    assert compiled.record.inductor_compiles == 3 and compiled._forward.direct


def test_a_call_the_traced_graph_does_not_fit_is_a_clear_error(two_layers):
    _, compiled, _, _ = two_layers
    with pytest.raises(ValueError, match=r"'input_ids' was a torch.int64 tensor of shape \(N, 8\).*now .*\(N, 9\)"):
        compiled(token_batch(2, seq_len=9), use_cache=False)
    with pytest.raises(ValueError, match="'use_cache' was False, now True"):
        compiled(token_batch(2), use_cache=True)
    with pytest.raises(ValueError, match="'attention_mask' was None, now a torch.int64 tensor"):
        compiled(token_batch(2), attention_mask=torch.ones(2, 8, dtype=torch.long), use_cache=False)
    with pytest.raises(TypeError, match="does not fit the forward's signature"):
        compiled(token_batch(2), token_batch(2), token_batch(2), token_batch(2), use_cache=False,
                 attention_mask=None)


def test_eight_layers_compile_as_much_as_two(two_layers, module_tmp):
    model = tiny_llama(8)
    compiled = kiln.compile(model, cache_root=module_tmp / "eight_layers")
    ids = token_batch(3)
    logits = compiled(ids, use_cache=False).logits
    record = compiled.record
    assert (record.pieces_total, record.pieces_splitting) == (17, 8)
    # No per-layer constant (layer_idx, names) reaches the graphs: the 7 layer joins are one piece.
    assert record.unique_pieces == 3 and record.inductor_compiles == two_layers[1].record.inductor_compiles == 3
    torch.testing.assert_close(logits, eager_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_warm_process_compiles_nothing(two_layers, tmp_path):
    model, _, root, _ = two_layers
    warm = run_child({"root": str(root), "layers": 2, "batch": 3}, tmp_path, child=CHILD)
    record = warm["record"]
    assert record["inductor_compiles"] == 0 and record["cache_misses"] == 0
    assert record["cache_hits"] == 3 and record["artifacts_loaded"] == 3
    assert warm["builds"] == []  # not even a C++ kernel build
    # ...nor a Dynamo trace: the cold compile kept its trace
    assert warm["dynamo_graphs"] == 0 and record["trace_cache"] == "skipped (cached)"
    assert warm["logits_sum"] == pytest.approx(eager_logits(model, token_batch(3)).double().sum().item(), abs=1e-4)


def test_torch_compile_backend_kiln_splits_at_sdpa(two_layers, monkeypatch):
    """The default config of backend="kiln" splits at SDPA too; traced alike (batch dim dynamic),
    its pieces are kiln.compile's: it loads the artifacts kiln.compile stored."""
    from kiln.workers.compilation.piecewise_backend import PiecewiseBackend

    _, _, root, _ = two_layers
    monkeypatch.setenv("KILN_CACHE_ROOT", str(root))
    records = []
    original = PiecewiseBackend.__call__

    def spy(self, gm, example_inputs):
        out = original(self, gm, example_inputs)
        records.append(self.record)
        return out

    monkeypatch.setattr(PiecewiseBackend, "__call__", spy)
    torch._dynamo.reset()
    model = tiny_llama(2)
    ids = token_batch(3)
    torch._dynamo.mark_dynamic(ids, 0)
    with torch.no_grad():
        logits = torch.compile(model, backend="kiln")(ids, use_cache=False).logits
    torch._dynamo.reset()
    [record] = records
    assert (record.pieces_total, record.pieces_splitting) == (5, 2)
    assert record.inductor_compiles == 0 and record.cache_hits == 3
    torch.testing.assert_close(logits, eager_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_an_output_kiln_cannot_rebuild_is_named(tmp_path):
    # use_cache=True returns a DynamicCache object: calls would go through Dynamo, where batch 1
    # is a graph of its own; kiln.compile says so rather than recompile.
    compiled = kiln.compile(tiny_llama(1), CompilationConfig(use_inductor=False), cache_root=tmp_path)
    with pytest.raises(RuntimeError, match="output holds DynamicCache.*batch of 2 or more"):
        compiled(token_batch(1), use_cache=True)


def test_kiln_compile_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        kiln.compile(lambda x: x)
    with pytest.raises(TypeError, match="config must be a CompilationConfig"):
        kiln.compile(torch.nn.Linear(2, 2), {"level": 3})
