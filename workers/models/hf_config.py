"""A Hugging Face `config.json`, read into the typed facts kiln's decoder needs (no torch here).

Both spellings that checkpoints carry are understood: transformers 4's `rope_theta` +
`rope_scaling` and `torch_dtype`, and transformers 5's `rope_parameters` and `dtype`. The
architecture (`architectures[0]`) picks the per-family flags (QKV bias, q/k norm, sliding window,
mixture of experts); anything else is refused naming the supported ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config.json that kiln cannot build a model from; the message names the file and key."""


@dataclass(frozen=True)
class ArchitectureFlags:
    qkv_bias: str | bool
    """True/False, or the name of the config key that says (Llama, Qwen3: `attention_bias`)."""
    o_bias: str | bool
    """The same for the output projection."""
    qk_norm: bool
    """Per-head RMSNorm of q and k before rotary (Qwen3)."""
    sliding_window_key: str | None
    """Key that switches the sliding window on (Qwen2/3: `use_sliding_window`); None: the
    window applies whenever `sliding_window` is set (Mistral) or never (Llama)."""
    has_sliding_window: bool = False
    moe: MoEFamily | None = None
    """Mixture-of-experts MLPs, and how this family spells them; None: dense MLPs only."""


@dataclass(frozen=True)
class MoEFamily:
    """How a mixture-of-experts family names and routes its experts."""

    intermediate_key: str
    """Config key of each expert's intermediate size."""
    softmax_first: bool
    """Routing: softmax over all experts, then the top k (Qwen3-MoE); else the top k logits,
    then a softmax over them (Mixtral)."""
    block: str
    """Checkpoint name of a layer's MoE block in the per-expert layout ("block_sparse_moe")."""
    expert_weights: tuple[str, str, str]
    """Per-expert tensor names of the gate, up and down matrices ("w1", "w3", "w2")."""
    has_dense_layers: bool
    """Layers may be dense MLPs instead (`mlp_only_layers`, `decoder_sparse_step`)."""


MIXTRAL = MoEFamily("intermediate_size", False, "block_sparse_moe", ("w1", "w3", "w2"), False)
QWEN3_MOE = MoEFamily("moe_intermediate_size", True, "mlp", ("gate_proj", "up_proj", "down_proj"), True)


@dataclass(frozen=True)
class MoEConfig:
    """A checkpoint's mixture-of-experts facts."""

    num_experts: int
    top_k: int
    """Experts per token (`num_experts_per_tok`)."""
    intermediate_size: int
    """Each expert's intermediate size (Mixtral: `intermediate_size`; Qwen3-MoE:
    `moe_intermediate_size`, while `intermediate_size` is the dense layers')."""
    renormalize: bool
    """Qwen3-MoE's `norm_topk_prob`: the top-k weights are divided by their sum (Mixtral's are
    a softmax over the top k, normalized anyway)."""
    sparse_layers: tuple[bool, ...]
    """Per layer: a MoE block (True) or a dense MLP (False)."""
    family: MoEFamily


ARCHITECTURES: dict[str, ArchitectureFlags] = {
    "LlamaForCausalLM": ArchitectureFlags("attention_bias", "attention_bias", False, None),
    "MistralForCausalLM": ArchitectureFlags(False, False, False, None, has_sliding_window=True),
    "Qwen2ForCausalLM": ArchitectureFlags(True, False, False, "use_sliding_window", has_sliding_window=True),
    "Qwen3ForCausalLM": ArchitectureFlags("attention_bias", "attention_bias", True, "use_sliding_window",
                                          has_sliding_window=True),
    "MixtralForCausalLM": ArchitectureFlags(False, False, False, None, has_sliding_window=True, moe=MIXTRAL),
    "Qwen3MoeForCausalLM": ArchitectureFlags("attention_bias", "attention_bias", True, "use_sliding_window",
                                             has_sliding_window=True, moe=QWEN3_MOE),
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class HFConfig:
    """What kiln's decoder needs from a checkpoint's config.json."""

    path: str
    """The config.json this was read from (for error messages)."""
    architecture: str
    """One of ARCHITECTURES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Explicit `head_dim` when the config gives one (Qwen3, Mistral), else hidden / heads."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None for plain rotary; else a dict with `rope_type` ("linear" or "llama3") and its factors."""
    tie_word_embeddings: bool
    """The LM head is the embedding matrix (Llama 3.2, small Qwen models): no lm_head tensor."""
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    sliding_window: int | None
    """Attention window when the architecture uses one, else None."""
    torch_dtype: str | None
    """The dtype the config names (`torch_dtype` or `dtype`), e.g. "bfloat16"; None if absent."""
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    moe: MoEConfig | None = None
    """Mixture-of-experts facts (Mixtral, Qwen3-MoE); None for dense models."""


def config_path(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, "config.json")


def read_hf_config(checkpoint_dir: str) -> HFConfig:
    """Read and check `<checkpoint_dir>/config.json`."""
    path = config_path(checkpoint_dir)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (a checkpoint directory needs a config.json)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return parse_hf_config(raw, path)


def parse_hf_config(raw: dict[str, Any], path: str = "config.json") -> HFConfig:
    arch = _architecture(raw, path)
    flags = ARCHITECTURES[arch]

    def need(key: str, kind: type = int) -> Any:
        value = raw.get(key)
        if value is None:
            raise ConfigError(f"{path}: {arch} needs {key!r}, which is missing")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{path}: {key!r} must be a positive integer, got {value!r}")
        return value

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{path}: hidden_act {act!r} is not supported (kiln's MLP is SiLU-gated)")
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = raw.get("head_dim") or hidden // heads
    if not raw.get("head_dim") and hidden % heads:
        raise ConfigError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                          "and no head_dim is given")
    theta, scaling = _rope(raw, path)
    mpe = raw.get("max_position_embeddings") or 2048
    layers = need("num_hidden_layers")
    return HFConfig(
        path=path,
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=_flag(flags.qkv_bias, raw),
        o_bias=_flag(flags.o_bias, raw),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=flags.qk_norm,
        max_position_embeddings=int(mpe),
        sliding_window=_sliding_window(flags, raw),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        eos_token_ids=_ids(raw.get("eos_token_id")),
        bos_token_id=raw.get("bos_token_id"),
        moe=_moe(flags.moe, raw, layers, need, path) if flags.moe is not None else None,
    )


def _moe(family: MoEFamily, raw: dict[str, Any], layers: int, need, path: str) -> MoEConfig:
    # transformers 5 saves Qwen3-MoE's expert count as num_local_experts (Mixtral's key);
    # published Qwen3-MoE checkpoints say num_experts.
    key = "num_experts" if raw.get("num_experts") is not None else "num_local_experts"
    experts, top_k = need(key), need("num_experts_per_tok")
    if top_k > experts:
        raise ConfigError(f"{path}: num_experts_per_tok {top_k} exceeds the {experts} experts ({key})")
    sparse = [True] * layers
    if family.has_dense_layers:
        only = raw.get("mlp_only_layers") or []
        step = raw.get("decoder_sparse_step", 1)
        if not isinstance(only, list) or not all(isinstance(i, int) and 0 <= i < layers for i in only):
            raise ConfigError(f"{path}: 'mlp_only_layers' must list layer indices 0..{layers - 1}, got {only!r}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise ConfigError(f"{path}: 'decoder_sparse_step' must be a positive integer, got {step!r}")
        # transformers' rule: a layer is sparse unless listed, and only every step-th one
        sparse = [i not in only and (i + 1) % step == 0 for i in range(layers)]
    return MoEConfig(num_experts=experts, top_k=top_k, intermediate_size=need(family.intermediate_key),
                     renormalize=bool(raw.get("norm_topk_prob", False)), sparse_layers=tuple(sparse),
                     family=family)


def _architecture(raw: dict[str, Any], path: str) -> str:
    supported = ", ".join(ARCHITECTURES)
    archs = raw.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise ConfigError(f"{path}: no 'architectures' list; kiln supports {supported}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; kiln supports {supported}")
    return arch


def _flag(flag: str | bool, raw: dict[str, Any]) -> bool:
    return bool(raw.get(flag, False)) if isinstance(flag, str) else flag


def _sliding_window(flags: ArchitectureFlags, raw: dict[str, Any]) -> int | None:
    if not flags.has_sliding_window:
        return None
    if flags.sliding_window_key is not None and not raw.get(flags.sliding_window_key, False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _rope(raw: dict[str, Any], path: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` +
    `rope_scaling` (transformers 4 and most published checkpoints)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = dict(raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{path}: rope type {rope_type!r} is not supported; kiln supports "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return float(theta), None
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in required if k not in merged]
    if missing:
        raise ConfigError(f"{path}: rope type {rope_type!r} needs {', '.join(missing)}")
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings") or 8192)
    return float(theta), {"rope_type": rope_type, **merged}


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
