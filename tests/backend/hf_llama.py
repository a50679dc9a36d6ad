"""A tiny transformers Llama (float32, SDPA attention), the unmodified model of kiln.compile's tests."""

from __future__ import annotations

import torch

VOCAB = 64


def tiny_llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=64,
                         attn_implementation="sdpa", dtype="float32")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def token_batch(batch: int, seq_len: int = 8, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
