"""Bad checkpoints and specs give errors that name the file and the tensor, raised while the
model is built (before any compile); plus the pure pieces: config.json parsing in both
transformers spellings, head and vocabulary partitions."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln import Orchestrator
from kiln.workers.layers.embedding import VocabPartition
from kiln.workers.layers.linear import HeadPartition, partition_heads
from kiln.workers.models.checkpoint import CheckpointError
from kiln.workers.models.hf_config import ConfigError, parse_hf_config
from kiln.workers.models.loader import build
from kiln.workers.models.spec import ModelSpecError, build_model, parse_model_spec
from tests.models.conftest import MODEL_ARGS, copy_checkpoint


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A private copy of the single-file qwen2 checkpoint and its tensors."""
    path = copy_checkpoint(checkpoints("qwen2"), tmp_path / "qwen2")
    file = path / "model.safetensors"
    return path, file, load_file(str(file))


def _build(path):
    return build_model(str(path), MODEL_ARGS)


def test_missing_tensor(broken):
    path, file, tensors = broken
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj"
                                              r"\.weight' is missing \(expected shape \[32, 64\]\)"):
        _build(path)


def test_wrong_shape(broken):
    path, file, tensors = broken
    tensors["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(8)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                              r"\.bias' has shape \[8\], expected \[16\]"):
        _build(path)


def test_wrong_dtype(broken):
    path, file, tensors = broken
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has dtype I32, expected a floating"):
        _build(path)


def test_unexpected_tensor(broken):
    path, file, tensors = broken
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old conversions: ignored
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(64, 32)  # a third layer config.json lacks
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp"
                                              r"\.up_proj\.weight'"):
        _build(path)


def test_truncated_file_names_the_tensor_cut_off(broken):
    path, file, _ = broken
    data = file.read_bytes()
    with open(file, "rb") as f:
        header = json.loads(f.read(8 + int.from_bytes(data[:8], "little"))[8:])
    last = max((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    file.write_bytes(data[:-4])
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated: .* tensor '{last}' lies past"):
        _build(path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="not even a safetensors header"):
        _build(path)


def test_sharded_index_naming_a_missing_file(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("llama2"), tmp_path / "llama2")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1  # the case is sharded
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"names '{shards[1].name}', which is not in"):
        _build(path)


def test_no_weights_points_to_dummy(checkpoints, tmp_path):
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text((checkpoints("qwen2").path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors files .* load_format='dummy'"):
        _build(only_config)


def test_unknown_architecture_refused_before_any_worker(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints("qwen2"), tmp_path / "gpt2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    expected = (r"architecture 'GPT2LMHeadModel' is not supported; kiln supports LlamaForCausalLM, "
                r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM")
    with pytest.raises(ModelSpecError, match=expected):
        parse_model_spec(str(path))
    with pytest.raises(ValueError, match=expected):  # the driver checks at construction
        Orchestrator(str(path), 2, progress=False)
    with pytest.raises(ConfigError, match=expected):  # and the worker's build
        build(str(path), **MODEL_ARGS)


def test_directory_without_config_and_old_specs(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json: not found"):
        parse_model_spec(str(tmp_path))
    assert parse_model_spec("examples/toy_llama.py:build") == ("examples/toy_llama.py", "build")
    with pytest.raises(ModelSpecError, match="or a checkpoint directory"):
        parse_model_spec("no-such-dir")


def test_config_limits_are_checked(checkpoints):
    path = str(checkpoints("qwen2").path)
    with pytest.raises(ConfigError, match="max_seq_len 100 exceeds max_position_embeddings 64"):
        build(path, **{**MODEL_ARGS, "max_seq_len": 100})
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        build(path, **{**MODEL_ARGS, "dtype": "int8"})


# ---- pure pieces -----------------------------------------------------------------------------

# config.json of Llama-3.1-8B as published (transformers 4 spelling: rope_theta + rope_scaling)
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_published_llama31_config():
    cfg = parse_hf_config(LLAMA31_8B)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_theta, cfg.torch_dtype) == (128, 8, 500000.0, "bfloat16")
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg.eos_token_ids == (128001, 128008, 128009) and not cfg.qkv_bias and cfg.sliding_window is None


def test_config_flags_per_architecture():
    base = {k: LLAMA31_8B[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_hidden_layers", "vocab_size")}
    qwen2 = parse_hf_config({**base, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                             "sliding_window": 4096})
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.sliding_window is None
    qwen3 = parse_hf_config({**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 64,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert qwen3.qk_norm and qwen3.head_dim == 64 and qwen3.rope_theta == 1e6 and qwen3.rope_scaling is None
    mistral = parse_hf_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    assert mistral.sliding_window == 4096
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        parse_hf_config({**base, "architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ConfigError, match="needs 'vocab_size', which is missing"):
        parse_hf_config({**base, "architectures": ["LlamaForCausalLM"], "vocab_size": None})


def test_kv_heads_replicated_when_fewer_than_ranks():
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 use KV head 0, ranks 2-3 KV head 1
    assert [partition_heads(8, 2, 4, r) for r in range(4)] == [
        HeadPartition(0, 2, 0, 1), HeadPartition(2, 2, 0, 1), HeadPartition(4, 2, 1, 1), HeadPartition(6, 2, 1, 1)]
    assert partition_heads(8, 4, 2, 1) == HeadPartition(4, 4, 2, 2)
    for r in range(8):  # every rank's query heads belong to its KV head's group (8 / 2 per group)
        part = partition_heads(16, 2, 8, r)
        assert part.q_start // 8 == part.kv_start
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads 3"):
        partition_heads(12, 3, 4, 0)
    with pytest.raises(ValueError, match="num_attention_heads 6 is not divisible by the tensor-parallel size 4"):
        partition_heads(6, 2, 4, 0)


def test_vocab_partition_pads_to_a_multiple_of_tp():
    parts = [VocabPartition(101, 4, r) for r in range(4)]
    assert {p.padded for p in parts} == {104} and {p.local for p in parts} == {26}
    assert [p.real for p in parts] == [26, 26, 26, 23]
    tiny = [VocabPartition(5, 4, r) for r in range(4)]  # the last rank holds padding only
    assert [p.real for p in tiny] == [2, 2, 1, 0]
    assert tiny[3].weight_slice("embed", 8).length == 0


def test_load_format_option_is_for_checkpoint_directories(tmp_path):
    from click.testing import CliRunner

    from kiln.orchestrator.cli import main

    result = CliRunner().invoke(main, ["warmup", "examples/toy_llama.py:build", "--load-format", "dummy",
                                       "--cache-root", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "--load-format" in result.output and "checkpoint directory" in result.output
