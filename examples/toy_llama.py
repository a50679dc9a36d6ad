"""A Llama-style decoder with tensor parallelism, kiln's example model.

Tokens come flattened: a batch of N tokens carries, per token, its id, its position in its
sequence and the KV-cache slot of that sequence. Prefill, decode and mixed batches are all just
N tokens; N is the batch size that kiln compiles and captures for.

Each rank holds its slice of one full model whose weights come from `seed` alone, so the output
at TP=N equals the output at TP=1 (up to the order of floating-point sums).

    embed → L × [RMSNorm → QKV (column-parallel) → rotary → kiln::attention (KV cache)
                 → O proj (row-parallel) + all_reduce → residual
                 → RMSNorm → gate/up (column-parallel) → SiLU-and-mul
                 → down (row-parallel) + all_reduce → residual]
          → RMSNorm → LM head
"""

from __future__ import annotations

import torch
import xxhash
from torch import nn

from kiln.workers.layers.attention import attention  # noqa: F401  (registers kiln::attention)
from kiln.workers.layers.collectives import all_reduce
from kiln.workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from kiln.workers.layers.parallel_state import tp_rank, tp_world_size


def _full_weight(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) float32 CPU weight `name`, drawn from (seed, name) alone, so every
    rank draws the same one whatever order it builds its layers in."""
    gen_seed = xxhash.xxh64_intdigest(f"{seed}:{name}".encode()) & 0x7FFF_FFFF_FFFF_FFFF
    gen = torch.Generator(device="cpu").manual_seed(gen_seed)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


class ToyLlamaConfig:
    def __init__(
        self,
        layers: int = 2,
        hidden: int = 64,
        heads: int = 4,
        kv_heads: int = 2,
        intermediate: int | None = None,
        vocab: int = 256,
        max_seq_len: int = 64,
        max_seqs: int = 8,
        dtype: str | torch.dtype = "float32",
        seed: int = 0,
        device: str | None = None,
    ):
        # Validate before deriving anything: hidden // heads with heads=0 would raise a
        # ZeroDivisionError that names no argument.
        for field, value in (("hidden", hidden), ("heads", heads), ("kv_heads", kv_heads),
                             ("layers", layers), ("vocab", vocab), ("max_seq_len", max_seq_len),
                             ("max_seqs", max_seqs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"toy_llama: {field} must be a positive integer, got {value!r}")
        self.layers = layers
        self.hidden = hidden
        self.heads = heads
        self.kv_heads = kv_heads
        self.intermediate = intermediate or 2 * hidden
        self.vocab = vocab
        self.max_seq_len = max_seq_len
        self.max_seqs = max_seqs
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.head_dim = hidden // heads
        tp = tp_world_size()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"toy_llama: need hidden % heads == 0 and heads % kv_heads == 0, got "
                             f"hidden={hidden} heads={heads} kv_heads={kv_heads}")
        if kv_heads % tp or self.intermediate % tp:
            raise ValueError(f"toy_llama: kv_heads={kv_heads} and intermediate={self.intermediate} "
                             f"must be divisible by the tensor-parallel size {tp}")


class ColumnParallelLinear(nn.Module):
    """y = x W_r^T where W_r is this rank's block of output rows (given as row index groups)."""

    def __init__(self, name: str, full_shape: tuple[int, int], rows: torch.Tensor, cfg: ToyLlamaConfig):
        super().__init__()
        full = _full_weight(name, full_shape, cfg.seed)
        self.weight = nn.Parameter(full[rows].to(cfg.device, cfg.dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) where W_r is this rank's block of input columns."""

    def __init__(self, name: str, full_shape: tuple[int, int], cfg: ToyLlamaConfig):
        super().__init__()
        tp, rank = tp_world_size(), tp_rank()
        cols = full_shape[1] // tp
        full = _full_weight(name, full_shape, cfg.seed)
        shard = full[:, rank * cols:(rank + 1) * cols]
        self.weight = nn.Parameter(shard.to(cfg.device, cfg.dtype).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(torch.nn.functional.linear(x, self.weight))


class Attention(nn.Module):
    def __init__(self, i: int, cfg: ToyLlamaConfig):
        super().__init__()
        tp, rank = tp_world_size(), tp_rank()
        d, hq, hkv = cfg.head_dim, cfg.heads, cfg.kv_heads
        self.hq, self.hkv, self.d = hq // tp, hkv // tp, d
        self.scale = d**-0.5
        # Rows of the full [q | k | v] weight owned by this rank: its kv-head group's q heads and
        # its kv heads, so that GQA groups never straddle ranks.
        q_rows = torch.arange(rank * self.hq * d, (rank + 1) * self.hq * d)
        k_rows = hq * d + torch.arange(rank * self.hkv * d, (rank + 1) * self.hkv * d)
        v_rows = (hq + hkv) * d + torch.arange(rank * self.hkv * d, (rank + 1) * self.hkv * d)
        rows = torch.cat((q_rows, k_rows, v_rows))
        self.qkv = ColumnParallelLinear(f"layers.{i}.qkv", ((hq + 2 * hkv) * d, cfg.hidden), rows, cfg)
        self.o_proj = RowParallelLinear(f"layers.{i}.o_proj", (cfg.hidden, hq * d), cfg)
        self.rotary = RotaryEmbedding(d, cfg.max_seq_len)
        # One extra slot (index max_seqs) takes the k/v of padding tokens.
        cache_shape = (cfg.max_seqs + 1, cfg.max_seq_len, self.hkv, d)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=cfg.dtype, device=cfg.device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=cfg.dtype, device=cfg.device), persistent=False)

    def forward(self, x, positions, seq_ids):
        n = x.shape[0]
        qkv = self.qkv(x)  # [N, (hq + 2 hkv) d]
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(n, self.hq, self.d)
        k = k.view(n, self.hkv, self.d)
        v = v.view(n, self.hkv, self.d)
        q, k = self.rotary(q, k, positions)
        out = torch.ops.kiln.attention(q, k, v, self.k_cache, self.v_cache, seq_ids, positions, self.scale)
        return self.o_proj(out.view(n, self.hq * self.d))  # [N, hidden]


class MLP(nn.Module):
    def __init__(self, i: int, cfg: ToyLlamaConfig):
        super().__init__()
        tp, rank = tp_world_size(), tp_rank()
        inter = cfg.intermediate // tp
        gate_rows = torch.arange(rank * inter, (rank + 1) * inter)
        rows = torch.cat((gate_rows, cfg.intermediate + gate_rows))  # [gate_r | up_r]
        self.gate_up = ColumnParallelLinear(f"layers.{i}.gate_up", (2 * cfg.intermediate, cfg.hidden), rows, cfg)
        self.act = SiluAndMul()
        self.down = RowParallelLinear(f"layers.{i}.down", (cfg.hidden, cfg.intermediate), cfg)

    def forward(self, x):
        return self.down(self.act(self.gate_up(x)))  # [N, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, i: int, cfg: ToyLlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden, dtype=cfg.dtype).to(cfg.device)
        self.attn = Attention(i, cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden, dtype=cfg.dtype).to(cfg.device)
        self.mlp = MLP(i, cfg)

    def forward(self, x, positions, seq_ids):
        x = x + self.attn(self.input_norm(x), positions, seq_ids)
        return x + self.mlp(self.post_attn_norm(x))


class ToyLlama(nn.Module):
    def __init__(self, cfg: ToyLlamaConfig):
        super().__init__()
        self.cfg = cfg
        # What generation needs to know (kiln.workers.runtime.generation): KV-cache slots,
        # positions per slot, token ids.
        self.max_seqs, self.max_seq_len, self.vocab_size = cfg.max_seqs, cfg.max_seq_len, cfg.vocab
        self.pad_slot = cfg.max_seqs
        emb = _full_weight("embed", (cfg.vocab, cfg.hidden), cfg.seed) * cfg.hidden**0.5
        self.embed = nn.Parameter(emb.to(cfg.device, cfg.dtype), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(i, cfg) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, dtype=cfg.dtype).to(cfg.device)
        head = _full_weight("lm_head", (cfg.vocab, cfg.hidden), cfg.seed)
        self.lm_head = nn.Parameter(head.to(cfg.device, cfg.dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        # input_ids, positions, seq_ids: [N] int64 -> logits [N, vocab]
        x = torch.nn.functional.embedding(input_ids, self.embed)  # [N, hidden]
        for layer in self.layers:
            x = layer(x, positions, seq_ids)
        return torch.nn.functional.linear(self.norm(x), self.lm_head)

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
        """The one definition of a decode batch for this model: every sequence in the batch adds
        exactly one token (the seq_ids are all distinct). Prefill and mixed batches are the rest.
        Costs a device-to-host sync; callers that know say `decode=True/False` instead."""
        return bool(torch.unique(seq_ids).numel() == seq_ids.numel())

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.k_cache.zero_()
            layer.attn.v_cache.zero_()


def build(**kwargs) -> ToyLlama:
    """Factory for kiln model specs (`examples/toy_llama.py:build`); kwargs go to ToyLlamaConfig."""
    cfg = ToyLlamaConfig(**kwargs)
    return ToyLlama(cfg).to(cfg.device).eval()  # .to(): buffers built on the CPU (rotary table)
