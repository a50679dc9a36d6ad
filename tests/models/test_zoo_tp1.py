"""The zoo at TP=1, in this process: logits equal transformers' eager logits for every
architecture (eager, level 0), once compiled piecewise (level 3), with dummy weights and with a
dtype the user asks for."""

from __future__ import annotations

import pytest
import torch

from kiln.cache import CacheStore
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import building_with
from kiln.workers.models.loader import build
from kiln.workers.models.spec import build_model
from kiln.workers.runtime.kiln_model import KilnModel
from tests.models.conftest import CASES, COMMON, MODEL_ARGS, distinct_pieces, flattened_batch, reference_logits


def _compare(kiln: KilnModel, tiny, rtol=1e-5, atol=1e-5) -> None:
    want_prefill, want_decode = reference_logits(tiny.hf, tiny.vocab)
    _, prefill, _, decode = flattened_batch(tiny.vocab)
    kiln.model.reset_cache()
    with torch.no_grad():
        got_prefill = kiln(*prefill).clone()
        got_decode = kiln(*decode, decode=True).clone()
    assert got_prefill.shape == (len(prefill[0]), tiny.vocab)
    torch.testing.assert_close(got_prefill, want_prefill, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_decode, want_decode, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(CASES))
def test_eager_matches_transformers(name, checkpoints):
    tiny = checkpoints(name)
    config = CompilationConfig(level=0)
    with building_with(config):
        model = build_model(str(tiny.path), MODEL_ARGS)  # the spec path the worker takes
    assert type(model).__name__ == "CausalLM" and model.hf_config.architecture == tiny.hf.config.architectures[0]
    total = sum(p.numel() * 4 for p in tiny.hf.state_dict().values())
    tied = tiny.hf.config.tie_word_embeddings
    assert model.loaded_bytes == total - (tiny.vocab * COMMON['hidden_size'] * 4 if tied else 0)  # every tensor, once
    kiln = KilnModel(model, config)
    kiln.compile([2])
    _compare(kiln, tiny)


def test_piecewise_compiled_matches_transformers(checkpoints, tmp_path):
    tiny = checkpoints("qwen3")
    config = CompilationConfig()  # level 3, Inductor
    with building_with(config):
        model = build(str(tiny.path), **MODEL_ARGS)
    kiln = KilnModel(model, config, store=CacheStore(str(tmp_path / "cache")))
    record = kiln.compile([2])
    assert record.pieces_splitting == tiny.layers
    assert record.pieces_compiled == tiny.layers + 1
    assert record.inductor_compiles == distinct_pieces(tiny.layers) == record.unique_pieces
    _compare(kiln, tiny, rtol=1e-4, atol=1e-5)


def test_dtype_model_arg_overrides_the_checkpoints(checkpoints):
    tiny = checkpoints("mistral")
    model = build(str(tiny.path), **{**MODEL_ARGS, "dtype": "bfloat16"})
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.layers[0].attn.k_cache.dtype == torch.bfloat16
    _, prefill, _, _ = flattened_batch(tiny.vocab)
    want, _ = reference_logits(tiny.hf, tiny.vocab)
    with torch.no_grad():
        got = model(*prefill)
    torch.testing.assert_close(got.float(), want, rtol=0.1, atol=0.15)  # bf16 weights: coarse


def test_dummy_weights_from_config_alone(checkpoints, tmp_path):
    tiny = checkpoints("llama3")
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny.path / "config.json").read_text())
    model = build(str(only_config), load_format="dummy", **MODEL_ARGS)
    assert model.loaded_bytes == 0
    assert model.layers[0].mlp.gate_up.weight.abs().sum() > 0
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert model.lm_head.weight is model.embed.weight  # tied, as config.json says
    _, prefill, _, _ = flattened_batch(tiny.vocab)
    with torch.no_grad():
        logits = model(*prefill)
    assert logits.shape == (len(prefill[0]), tiny.vocab) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy"):
        build(str(only_config), load_format="random", **MODEL_ARGS)
