"""Mixture-of-experts models in the zoo (Mixtral, Qwen3-MoE), against transformers (float32):
logits at TP=1 and TP=2, greedy generation, both expert layouts, dummy weights; compiled
piecewise, identical MoE layers compile once (and depth adds no compiles), a new batch size
compiles nothing, a warm start compiles nothing."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from kiln import CompilationConfig, Orchestrator
from kiln.cache import CacheStore
from kiln.workers.layers.custom_op import building_with
from kiln.workers.layers.moe import ExpertWeights, SparseMoE, combine, group_by_expert, route
from kiln.workers.layers import moe_triton
from kiln.workers.layers.moe_experts import experts_grouped, experts_loop, moe_experts_impl, moe_routed_impl
from kiln.workers.models.hf_config import ConfigError, parse_hf_config
from kiln.workers.models.loader import build
from kiln.workers.runtime.generation import greedy_generate
from kiln.workers.runtime.kiln_model import KilnModel
from tests.models.conftest import MODEL_ARGS, Tiny, flattened_batch, reference_logits
from tests.models.test_zoo_generate import NEW_TOKENS, PROMPTS, transformers_greedy

# The same rms_norm_eps and head_dim (so attention scale) everywhere: Dynamo makes a float that
# changed since its last trace of the same code a graph input ("automatic dynamic"), which would
# make a second model traced in this process bind differently (kiln's workers build one model each).
SMALL = {"hidden_size": 32, "num_attention_heads": 4, "head_dim": 16, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 64, "num_experts_per_tok": 2}
# name -> (transformers model class, config overrides)
CASES = {
    # 4 experts of intermediate 64, one KV head for two ranks, a vocabulary TP=2 does not divide
    "mixtral": ("Mixtral", {"vocab_size": 101, "num_key_value_heads": 1, "intermediate_size": 64,
                            "num_local_experts": 4, "num_hidden_layers": 2}),
    # dense layer 1 between sparse layers 0 and 2 (mlp_only_layers), renormalized top-k, q/k norm
    "qwen3_moe": ("Qwen3Moe", {"vocab_size": 99, "num_key_value_heads": 2, "intermediate_size": 64,
                               "moe_intermediate_size": 32, "num_experts": 8, "num_hidden_layers": 3,
                               "mlp_only_layers": [1], "norm_topk_prob": True}),
    # every second layer sparse (decoder_sparse_step), top-k weights not renormalized
    "qwen3_moe_step": ("Qwen3Moe", {"vocab_size": 99, "num_key_value_heads": 2,
                                    "intermediate_size": 64, "moe_intermediate_size": 32, "num_experts": 8,
                                    "num_hidden_layers": 2, "decoder_sparse_step": 2, "norm_topk_prob": False}),
    # Mixtral with 4 layers: the same pieces as with 2
    "mixtral_4": ("Mixtral", {"vocab_size": 101, "num_key_value_heads": 1, "intermediate_size": 64,
                              "num_local_experts": 4, "num_hidden_layers": 4}),
}


def make_hf_model(name: str) -> torch.nn.Module:
    import transformers

    family, overrides = CASES[name]
    config = getattr(transformers, f"{family}Config")(**{**SMALL, **overrides})
    config._attn_implementation = "eager"
    # transformers' own loop over experts, not its grouped-matmul path (which kiln's CUDA path shares)
    config._experts_implementation = "eager"
    torch.manual_seed(len(name))
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # O(1) activations and decisive routing (no near-ties between experts)
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif "embed" in pname:
                p.normal_(0.0, 1.0)
            else:  # 2-D weights and the 3-D [E, out, in] experts: unit-variance outputs
                p.normal_(0.0, (3.0 if pname.endswith("mlp.gate.weight") else 1.0) * p.shape[-1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """name -> Tiny, saved with save_pretrained on first use."""
    made: dict[str, Tiny] = {}
    root = tmp_path_factory.mktemp("moe-ckpt")

    def get(name: str) -> Tiny:
        if name not in made:
            model = make_hf_model(name)
            model.save_pretrained(root / name, safe_serialization=True)
            made[name] = Tiny(name, root / name, model)
        return made[name]

    return get


def sparse_layers(tiny: Tiny) -> list[bool]:
    """transformers' own choice, per layer: a sparse MoE block or a dense MLP."""
    return ["Sparse" in type(layer.mlp).__name__ for layer in tiny.hf.model.layers]


def distinct_pieces(sparse: list[bool]) -> int:
    """Distinct compiled pieces of a decoder split at its attentions: the first (embedding up to
    the first attention), one middle kind per kind of MLP among the layers followed by another
    layer (a layer's tail and the next one's head), and the last (up to the logits)."""
    return 2 + len(set(sparse[:-1]))


def _compare(run, tiny: Tiny, rtol=1e-5, atol=1e-5) -> None:
    want_prefill, want_decode = reference_logits(tiny.hf, tiny.vocab)
    _, prefill, _, decode = flattened_batch(tiny.vocab)
    with torch.no_grad():
        got_prefill = run(*prefill).clone()
        got_decode = run(*decode, decode=True).clone()
    torch.testing.assert_close(got_prefill, want_prefill, rtol=rtol, atol=atol)
    torch.testing.assert_close(got_decode, want_decode, rtol=rtol, atol=atol)


def _kiln(path, config: CompilationConfig, root=None) -> KilnModel:
    with building_with(config):
        model = build(str(path), **MODEL_ARGS)
    return KilnModel(model, config, store=CacheStore(str(root)) if root is not None else None)


# ---- TP=1, eager ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen3_moe_step"])
def test_eager_matches_transformers(name, moe_checkpoints):
    tiny = moe_checkpoints(name)
    kiln = _kiln(tiny.path, CompilationConfig(level=0))
    model = kiln.model
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.layers] == sparse_layers(tiny)
    assert len(set(sparse_layers(tiny))) == (1 if name == "mixtral" else 2)  # the case covers what it says
    # every tensor read once, one file per expert matrix (save_pretrained's per-expert layout)
    assert model.loaded_bytes == sum(p.numel() * 4 for p in tiny.hf.state_dict().values())
    kiln.compile([2])
    _compare(kiln, tiny)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_loads_alike(name, moe_checkpoints, tmp_path):
    """transformers 5's own tensors ([E, 2I, H] gate_up_proj, [E, H, I] down_proj, Mixtral's
    block renamed to mlp) saved as they are: the same model."""
    tiny = moe_checkpoints(name)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tiny.path / "config.json").read_text())
    tensors = {k: v.contiguous() for k, v in tiny.hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)
    save_file(tensors, str(fused / "model.safetensors"))
    kiln = _kiln(fused, CompilationConfig(level=0))
    moe = next(layer.mlp for layer in kiln.model.layers if isinstance(layer.mlp, SparseMoE))
    assert moe.sources.fused
    kiln.compile([2])
    _compare(kiln, tiny)


def test_dummy_weights_from_config_alone(moe_checkpoints, tmp_path):
    tiny = moe_checkpoints("qwen3_moe")
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny.path / "config.json").read_text())
    model = build(str(only_config), load_format="dummy", **MODEL_ARGS)
    moe = model.layers[0].mlp
    assert model.loaded_bytes == 0 and isinstance(moe, SparseMoE)
    assert all(bool(t.abs().sum() > 0) for t in (moe.router.weight, moe.gate_up, moe.down))
    _, prefill, _, _ = flattened_batch(tiny.vocab)
    with torch.no_grad():
        logits = model(*prefill)
    assert logits.shape == (len(prefill[0]), tiny.vocab) and torch.isfinite(logits).all()


def test_bad_moe_configs_are_named(moe_checkpoints):
    import json

    raw = json.loads((moe_checkpoints("qwen3_moe").path / "config.json").read_text())
    with pytest.raises(ConfigError, match="num_experts_per_tok 9 exceeds the 8 experts"):
        parse_hf_config({**raw, "num_experts_per_tok": 9})
    with pytest.raises(ConfigError, match=r"'mlp_only_layers' must list layer indices 0\.\.2, got \[3\]"):
        parse_hf_config({**raw, "mlp_only_layers": [3]})
    with pytest.raises(ConfigError, match="'decoder_sparse_step' must be a positive integer"):
        parse_hf_config({**raw, "decoder_sparse_step": 0})
    without = {k: v for k, v in raw.items() if k != "moe_intermediate_size"}
    with pytest.raises(ConfigError, match="Qwen3MoeForCausalLM needs 'moe_intermediate_size'"):
        parse_hf_config(without)


def test_grouped_matmuls_equal_the_loop():
    """The CUDA path's two grouped matmuls (here through torch's CPU implementation of
    _grouped_mm) give the reference loop's rows, empty experts included."""
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, n, k = 6, 16, 8, 5, 2
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen)
    down = torch.randn(experts, hidden, inter, generator=gen)
    x = torch.randn(n, hidden, generator=gen)
    chosen = torch.randint(0, 3, (n, k), generator=gen)  # experts 3..5 get no rows
    order, offsets = group_by_expert(chosen, experts)
    assert offsets.tolist()[2:] == [n * k] * 4 and offsets.dtype == torch.int32
    rows = x[order // k]
    want = experts_loop(rows, offsets, gate_up, down)
    for e, (lo, hi) in enumerate(zip([0, *offsets.tolist()[:-1]], offsets.tolist())):
        expected = torch.nn.functional.linear(rows[lo:hi], gate_up[e])
        expected = torch.nn.functional.linear(torch.nn.functional.silu(expected[:, :inter]) * expected[:, inter:],
                                              down[e])
        torch.testing.assert_close(want[lo:hi], expected)
    torch.testing.assert_close(experts_grouped(rows, offsets, gate_up, down), want)


def test_cpu_takes_the_loop_not_the_triton_kernels(monkeypatch):
    """On the CPU kiln::moe_experts is the reference loop, whatever the row limit says."""
    gen = torch.Generator().manual_seed(0)
    experts, hidden, inter, n, k = 4, 16, 8, 3, 2
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen).to(torch.bfloat16)
    down = torch.randn(experts, hidden, inter, generator=gen).to(torch.bfloat16)
    order, offsets = group_by_expert(torch.randint(0, experts, (n, k), generator=gen), experts)
    rows = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)[order // k]
    monkeypatch.setenv(moe_triton.MAX_ROWS_ENV, "1000")
    assert not moe_triton.triton_moe_supported(rows, gate_up, down)

    def no_triton(*args):
        raise AssertionError("the Triton path ran on the CPU")

    monkeypatch.setattr("kiln.workers.layers.moe_experts.triton_moe_experts", no_triton)
    monkeypatch.setattr("kiln.workers.layers.moe_experts.triton_moe_routed", no_triton)
    torch.testing.assert_close(moe_experts_impl(rows, offsets, gate_up, down),
                               experts_loop(rows, offsets, gate_up, down), rtol=0, atol=0)
    # kiln::moe_routed (SparseMoE's op on CUDA) off the Triton path: sort, the experts, the sum
    x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
    weights, chosen = route(torch.randn(n, experts, generator=gen), k, True, True)
    order, offsets = group_by_expert(chosen, experts)
    want = combine(experts_loop(x[order // k], offsets, gate_up, down), order, weights)
    torch.testing.assert_close(moe_routed_impl(x, weights, chosen, gate_up, down), want, rtol=0, atol=0)


def test_cpu_sparse_moe_traces_the_sort_around_moe_experts():
    """On the CPU, SparseMoE runs the sort, kiln::moe_experts and the weighted sum as before;
    kiln::moe_routed (its CUDA op) is not called."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    moe = SparseMoE(16, 8, 4, 2, softmax_first=True, renormalize=True, weights=ExpertWeights.fused_layout("mlp"),
                    dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
        with Ops() as ops:
            moe(torch.randn(3, 16))
    assert "kiln.moe_experts.default" in ops.names and "kiln.moe_routed.default" not in ops.names, ops.names


@pytest.mark.parametrize(("device", "dtype", "weights", "rows", "available", "limit", "chosen"), [
    ("cuda", torch.bfloat16, torch.bfloat16, 8, True, 64, True),
    ("cuda", torch.bfloat16, torch.bfloat16, 64, True, 64, True),  # the limit itself is included
    ("cuda", torch.bfloat16, torch.bfloat16, 65, True, 64, False),  # above: grouped matmuls
    ("cuda", torch.float16, torch.float16, 1, True, 64, True),
    ("cuda", torch.float32, torch.float32, 1, True, 64, False),  # float32: the loop
    ("cuda", torch.bfloat16, torch.float16, 1, True, 64, False),  # mixed dtypes
    ("cuda", torch.bfloat16, torch.bfloat16, 1, False, 64, False),  # no Triton
    ("cuda", torch.bfloat16, torch.bfloat16, 1, True, 0, False),  # limit 0: off
    ("cuda", torch.bfloat16, torch.bfloat16, 0, True, 64, False),  # no rows
    ("cpu", torch.bfloat16, torch.bfloat16, 1, True, 64, False),
])
def test_triton_dispatch_rule(device, dtype, weights, rows, available, limit, chosen):
    assert moe_triton.choose_triton(device, dtype, weights, rows, available, limit) is chosen


def test_triton_row_limit_and_blocks_from_the_environment(monkeypatch):
    monkeypatch.delenv(moe_triton.MAX_ROWS_ENV, raising=False)
    assert moe_triton.max_rows() == moe_triton.DEFAULT_MAX_ROWS == 128
    monkeypatch.setenv(moe_triton.MAX_ROWS_ENV, "16")
    assert moe_triton.max_rows() == 16
    monkeypatch.setenv(moe_triton.BLOCKS_ENV, "32,128,64,64")
    assert moe_triton.block_sizes(8, 768, 2048) == (32, 128, 64, 64)
    monkeypatch.setenv(moe_triton.BLOCKS_ENV, "32,100,64,64")
    with pytest.raises(AssertionError):
        moe_triton.block_sizes(8, 768, 2048)


def test_expert_computation_as_a_splitting_op(moe_checkpoints):
    """Named in splitting_ops, kiln::moe_experts runs eagerly between pieces: one more
    splitting piece per MoE layer, the same logits."""
    tiny = moe_checkpoints("qwen3_moe")
    config = CompilationConfig(use_inductor=False, splitting_ops=["kiln::attention", "kiln::moe_experts"])
    kiln = _kiln(tiny.path, config)
    record = kiln.compile([2])
    assert record.pieces_splitting == tiny.layers + sum(sparse_layers(tiny))
    kiln.model.reset_cache()
    _compare(kiln, tiny)


def test_greedy_generate_equals_transformers_at_tp1(moe_checkpoints):
    tiny = moe_checkpoints("mixtral")
    want = [transformers_greedy(tiny.hf, p, NEW_TOKENS) for p in PROMPTS]
    assert any(len(set(w)) > 1 for w in want)
    kiln = _kiln(tiny.path, CompilationConfig(use_inductor=False))
    kiln.compile([1, 2, 4])
    kiln.model.reset_cache()
    result = greedy_generate(lambda i, p, s, d: kiln(i, p, s, decode=d), PROMPTS, NEW_TOKENS, torch.device("cpu"))
    assert result.tokens == want


# ---- TP=1, compiled ---------------------------------------------------------------------------


def test_identical_moe_layers_compile_once(moe_checkpoints, tmp_path):
    """Depth adds no compiles (2 and 4 layers: the same 3 pieces), a new batch size compiles
    nothing, a warm start compiles nothing, and the compiled model matches transformers."""
    config = CompilationConfig()  # level 3, Inductor
    two = _kiln(moe_checkpoints("mixtral").path, config, tmp_path / "two").compile([2])
    tiny = moe_checkpoints("mixtral_4")
    kiln = _kiln(tiny.path, config, tmp_path / "four")
    record = kiln.compile([2])
    assert two.inductor_compiles == record.inductor_compiles == distinct_pieces(sparse_layers(tiny)) == 3
    assert record.unique_pieces == 3 and record.pieces_compiled == tiny.layers + 1
    kiln.model.reset_cache()
    _compare(kiln, tiny, rtol=1e-4, atol=1e-5)  # prefill of 12 tokens, decode of 3: sizes not compiled
    assert record.inductor_compiles == 3

    warm = _kiln(tiny.path, CompilationConfig(), tmp_path / "four")
    warm_record = warm.compile([2])
    assert warm_record.inductor_compiles == 0 and warm_record.artifacts_loaded == 3
    warm.model.reset_cache()
    _compare(warm, tiny, rtol=1e-4, atol=1e-5)


def test_dense_and_moe_layers_compile_per_kind(moe_checkpoints, tmp_path):
    tiny = moe_checkpoints("qwen3_moe")  # sparse, dense, sparse
    kiln = _kiln(tiny.path, CompilationConfig(), tmp_path / "cache")
    record = kiln.compile([2])
    assert record.inductor_compiles == record.unique_pieces == distinct_pieces(sparse_layers(tiny)) == 4
    kiln.model.reset_cache()
    _compare(kiln, tiny, rtol=1e-4, atol=1e-5)


# ---- TP=2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_tp2_matches_transformers(name, moe_checkpoints, ray_cluster, tmp_path):
    tiny = moe_checkpoints(name)
    want_prefill, want_decode = reference_logits(tiny.hf, tiny.vocab)
    _, prefill, _, decode = flattened_batch(tiny.vocab)
    with Orchestrator(str(tiny.path), 2, CompilationConfig(level=0), str(tmp_path / "cache"),
                      model_kwargs=MODEL_ARGS, device="cpu", progress=False) as orch:
        report = orch.warmup([2])
        orch.reset_cache()
        got_prefill = orch.run(*prefill)
        got_decode = orch.run(*decode, decode=True)
    torch.testing.assert_close(got_prefill, want_prefill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_decode, want_decode, rtol=1e-4, atol=1e-5)
    # Each rank read only its slices: half of every expert, the router and norms whole.
    total = sum(os.path.getsize(f) for f in tiny.path.glob("*.safetensors"))
    loaded = [next(p for p in r["phases"] if p["name"] == "load_weights")["extra"]["bytes"] for r in report.ranks]
    assert all(0 < b < 0.75 * total for b in loaded)


def test_greedy_generate_equals_transformers_at_tp2(moe_checkpoints, ray_cluster, tmp_path):
    tiny = moe_checkpoints("qwen3_moe")
    want = [transformers_greedy(tiny.hf, p, NEW_TOKENS) for p in PROMPTS]
    assert any(len(set(w)) > 1 for w in want)
    with Orchestrator(str(tiny.path), 2, CompilationConfig(use_inductor=False), str(tmp_path / "cache"),
                      model_kwargs=MODEL_ARGS, device="cpu", progress=False) as orch:
        orch.warmup([1, 2, 4])
        result = orch.generate(PROMPTS, NEW_TOKENS)
    assert result.tokens == want
