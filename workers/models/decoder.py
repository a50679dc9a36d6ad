"""kiln's decoder for the Llama family (Llama 2/3.x, Mistral, Qwen2, Qwen3, and the mixtures of
experts Mixtral and Qwen3-MoE), tensor-parallel per rank.

One implementation with flags from `HFConfig`: QKV bias (Qwen2; Llama/Qwen3 when
`attention_bias`), per-head q/k RMSNorm before rotary (Qwen3, Qwen3-MoE), rope scaling (Llama 3.x),
tied embeddings (Llama 3.2, small Qwen), MoE blocks in place of the MLP (Mixtral: every layer;
Qwen3-MoE: the layers its config makes sparse, dense MLPs elsewhere). Parameter names follow the
checkpoints' so that each layer can say which checkpoint slices it holds (`weight_slices()`, read
by the loader).

Tokens come flattened, as in the example model: a batch of N tokens carries, per token, its id,
its position in its sequence and the KV-cache slot of that sequence.

    embed (vocab-parallel) → L × [RMSNorm → QKV (column-parallel) → (q/k norm) → rotary
                                  → kiln::attention (KV cache) → O (row-parallel) + all_reduce → residual
                                  → RMSNorm → gate/up (column-parallel) → SiLU-and-mul
                                  → down (row-parallel) + all_reduce → residual]
                                  (MoE layers: → RMSNorm → SparseMoE + all_reduce → residual)
          → RMSNorm → LM head (vocab-parallel, all-gathered: full logits on every rank)

Layers are built alike and hold no layer index or rank in anything forward() reads, so the
pieces between two attentions are identical and compile once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kiln.workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from kiln.workers.layers.attention import attention  # noqa: F401  (registers kiln::attention)
from kiln.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from kiln.workers.layers.linear import QKVParallelLinear, RowParallelLinear, merged_column_parallel
from kiln.workers.layers.moe import ExpertWeights, SparseMoE
from kiln.workers.layers.parallel_state import tp_world_size
from kiln.workers.layers.shards import Placed, WeightSlice, split_evenly
from kiln.workers.models.hf_config import HFConfig


@dataclass(frozen=True)
class RuntimeArgs:
    """How this rank's model is laid out in memory (the model args that are not in config.json);
    the names match the example model's config (`model.cfg.max_seqs` and so on)."""

    dtype: torch.dtype
    device: torch.device
    max_seqs: int
    """KV-cache slots (concurrent sequences); one more slot takes padding tokens."""
    max_seq_len: int
    """Positions per KV-cache slot (prompt + generated tokens)."""
    vocab: int
    expert_layout: str = "per_expert"
    """How the checkpoint stores MoE experts: "per_expert" (one tensor per expert and matrix, as
    published checkpoints and transformers' save_pretrained have them) or "fused" (transformers
    5's `experts.gate_up_proj` / `experts.down_proj`); the loader picks it from the tensor names."""


def _norm(hidden: int, eps: float, source: str, args: RuntimeArgs) -> RMSNorm:
    norm = RMSNorm(hidden, eps, dtype=args.dtype).to(args.device)
    norm.source = source  # the checkpoint tensor its weight comes from (see norm_slices)
    return norm


def norm_slices(*norms: RMSNorm) -> Iterator[Placed]:
    for norm in norms:
        yield norm.weight, WeightSlice.whole(norm.source, tuple(norm.weight.shape))


class Attention(nn.Module):
    def __init__(self, cfg: HFConfig, prefix: str, rotary: RotaryEmbedding, args: RuntimeArgs):
        super().__init__()
        d = cfg.head_dim
        self.qkv = QKVParallelLinear(cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
                                     prefix, cfg.qkv_bias, args.dtype, args.device)
        self.hq, self.hkv, self.d = self.qkv.partition.q_heads, self.qkv.partition.kv_heads, d
        self.scale = d**-0.5
        self.q_norm = _norm(d, cfg.rms_norm_eps, f"{prefix}.q_norm.weight", args) if cfg.qk_norm else None
        self.k_norm = _norm(d, cfg.rms_norm_eps, f"{prefix}.k_norm.weight", args) if cfg.qk_norm else None
        self.rotary = rotary
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, f"{prefix}.o_proj",
                                        cfg.o_bias, args.dtype, args.device)
        # One extra slot (index max_seqs) takes the k/v of padding tokens.
        cache_shape = (args.max_seqs + 1, args.max_seq_len, self.hkv, d)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=args.dtype, device=args.device),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=args.dtype, device=args.device),
                             persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x)  # [N, (hq + 2 hkv) d] (this rank's heads)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(n, self.hq, self.d)
        k = k.view(n, self.hkv, self.d)
        v = v.view(n, self.hkv, self.d)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head's d channels
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, k, positions)
        out = torch.ops.kiln.attention(q, k, v, self.k_cache, self.v_cache, seq_ids, positions, self.scale)
        return self.o_proj(out.view(n, self.hq * self.d))  # [N, hidden]

    def weight_slices(self) -> Iterator[Placed]:
        if self.q_norm is not None:
            yield from norm_slices(self.q_norm, self.k_norm)


class MLP(nn.Module):
    def __init__(self, cfg: HFConfig, prefix: str, args: RuntimeArgs):
        super().__init__()
        inter = cfg.intermediate_size
        split_evenly(inter, tp_world_size(), 0, "intermediate_size")  # a clear error before building
        self.gate_up = merged_column_parallel(cfg.hidden_size, inter, [f"{prefix}.gate_proj", f"{prefix}.up_proj"],
                                              cfg.mlp_bias, args.dtype, args.device)
        self.act = SiluAndMul()
        self.down = RowParallelLinear(inter, cfg.hidden_size, f"{prefix}.down_proj", cfg.mlp_bias,
                                      args.dtype, args.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate_up(x)))  # [N, hidden]


def _moe(cfg: HFConfig, prefix: str, args: RuntimeArgs) -> SparseMoE:
    moe = cfg.moe
    assert moe is not None and args.expert_layout in ("per_expert", "fused"), args.expert_layout
    if args.expert_layout == "fused":  # transformers 5 calls every family's block "mlp"
        weights = ExpertWeights.fused_layout(f"{prefix}.mlp")
    else:
        weights = ExpertWeights.per_expert(f"{prefix}.{moe.family.block}", *moe.family.expert_weights)
    return SparseMoE(cfg.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
                     softmax_first=moe.family.softmax_first, renormalize=moe.renormalize, weights=weights,
                     dtype=args.dtype, device=args.device)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: HFConfig, i: int, rotary: RotaryEmbedding, args: RuntimeArgs):
        super().__init__()
        prefix = f"model.layers.{i}"
        self.input_norm = _norm(cfg.hidden_size, cfg.rms_norm_eps, f"{prefix}.input_layernorm.weight", args)
        self.attn = Attention(cfg, f"{prefix}.self_attn", rotary, args)
        self.post_attn_norm = _norm(cfg.hidden_size, cfg.rms_norm_eps,
                                    f"{prefix}.post_attention_layernorm.weight", args)
        self.mlp = _moe(cfg, prefix, args) if cfg.moe is not None and cfg.moe.sparse_layers[i] else \
            MLP(cfg, f"{prefix}.mlp", args)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), positions, seq_ids)
        return x + self.mlp(self.post_attn_norm(x))

    def weight_slices(self) -> Iterator[Placed]:
        yield from norm_slices(self.input_norm, self.post_attn_norm)


class CausalLM(nn.Module):
    """A decoder-only LM of the Llama family on this rank, in kiln's batch contract."""

    def __init__(self, cfg: HFConfig, args: RuntimeArgs):
        super().__init__()
        self.hf_config, self.cfg = cfg, args
        self.pad_slot = args.max_seqs
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, "model.embed_tokens.weight",
                                            args.dtype, args.device)
        # One rotary table shared by all layers (built once, on the CPU in float32, then moved).
        rotary = RotaryEmbedding(cfg.head_dim, args.max_seq_len, cfg.rope_theta, cfg.rope_scaling).to(args.device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, args) for i in range(cfg.num_hidden_layers))
        self.norm = _norm(cfg.hidden_size, cfg.rms_norm_eps, "model.norm.weight", args)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, "lm_head.weight", args.dtype, args.device,
                                      tied=self.embed if cfg.tie_word_embeddings else None)
        # The generation protocol (kiln.workers.runtime.generation): KV-cache limits, full vocab.
        self.max_seqs, self.max_seq_len, self.vocab_size = args.max_seqs, args.max_seq_len, cfg.vocab_size
        self.loaded_bytes = 0
        """Checkpoint bytes this rank read (0 for dummy weights); set by the loader."""
        self.load_seconds = 0.0
        """Seconds spent reading them into the parameters; set by the loader."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, positions, seq_ids: [N] int64 -> logits [N, vocab]
        x = self.embed(input_ids)  # [N, hidden]
        for layer in self.layers:
            x = layer(x, positions, seq_ids)
        return self.lm_head(self.norm(x))

    def weight_slices(self) -> Iterator[Placed]:
        yield from norm_slices(self.norm)

    # --- the batch contract kiln's runner relies on -------------------------------------------

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """A decode batch of `num_tokens` sequences (slots wrap around), for tracing and capture."""
        dev = self.cfg.device
        ids = torch.arange(num_tokens, device=dev) % self.cfg.vocab
        slots = torch.arange(num_tokens, device=dev) % self.cfg.max_seqs
        positions = torch.zeros(num_tokens, dtype=torch.long, device=dev)
        return ids, positions, slots

    def pad_values(self) -> tuple[int, ...]:
        """Fill value per input for padding rows: they write only to the spare KV-cache slot."""
        return (0, 0, self.pad_slot)

    def is_decode_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> bool:
        """Every sequence in the batch adds exactly one token (the seq_ids are all distinct)."""
        return bool(torch.unique(seq_ids).numel() == seq_ids.numel())

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.k_cache.zero_()
            layer.attn.v_cache.zero_()
