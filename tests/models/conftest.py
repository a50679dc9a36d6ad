"""Tiny Hugging Face checkpoints (made with transformers, float32, safetensors) and their
reference logits, for the zoo tests.

Each case is one architecture with the features it stands for; weights are redrawn at O(1)
scale (norm weights around 1, biases non-zero) so that logits are O(1) and a tight tolerance
means something. Sequences go through kiln's flattened contract: a prefill of a few sequences in
one batch, then a decode step of one token each; the reference is transformers' eager forward
of each whole sequence.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

COMMON = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
          "max_position_embeddings": 64}
# transformers 4's spelling (what published checkpoints carry); transformers 5 saves it as rope_parameters
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (transformers config class, config overrides, save_pretrained kwargs)
CASES = {
    # Llama 2 shape; a vocabulary TP=2 does not divide, one KV head for two ranks, biases on
    # attention and MLP (row-parallel biases), 3 layers (identical middle pieces), sharded.
    "llama2": ("LlamaConfig", {"vocab_size": 101, "num_key_value_heads": 1, "num_hidden_layers": 3,
                               "attention_bias": True, "mlp_bias": True}, {"max_shard_size": "20KB"}),
    # Llama 3.2 shape: llama3 rope scaling, tied embeddings.
    "llama3": ("LlamaConfig", {"vocab_size": 128, "num_key_value_heads": 2, "rope_scaling": LLAMA3_ROPE,
                               "rope_theta": 500000.0,
                               "tie_word_embeddings": True}, {}),
    # explicit head_dim (16, not hidden / heads = 8)
    "mistral": ("MistralConfig", {"vocab_size": 128, "num_key_value_heads": 2, "head_dim": 16}, {}),
    # QKV bias
    "qwen2": ("Qwen2Config", {"vocab_size": 128, "num_key_value_heads": 2}, {}),
    # per-head q/k norm, explicit head_dim, tied embeddings with an odd vocabulary
    "qwen3": ("Qwen3Config", {"vocab_size": 99, "num_key_value_heads": 2, "head_dim": 16,
                              "tie_word_embeddings": True}, {}),
}
ARCHITECTURES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}

PROMPT_LENS = (5, 3, 4)
# Model args for the zoo models in these tests: a small KV cache, on the CPU.
MODEL_ARGS = {"max_seq_len": 16, "max_seqs": 4, "device": "cpu"}


@dataclass
class Tiny:
    name: str
    path: Path
    hf: torch.nn.Module
    """The transformers model (eager attention) the checkpoint was saved from."""

    @property
    def layers(self) -> int:
        return self.hf.config.num_hidden_layers

    @property
    def vocab(self) -> int:
        return self.hf.config.vocab_size


def make_hf_model(name: str) -> torch.nn.Module:
    import transformers

    config_cls, overrides, _ = CASES[name]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(len(name))
    model = getattr(transformers, ARCHITECTURES[config_cls])(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5 if p.ndim == 2 and "embed" not in pname else 1.0)
    return model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> Tiny, each saved on first use."""
    made: dict[str, Tiny] = {}
    root = tmp_path_factory.mktemp("ckpt")

    def get(name: str) -> Tiny:
        if name not in made:
            model = make_hf_model(name)
            path = root / name
            model.save_pretrained(path, safe_serialization=True, **CASES[name][2])
            made[name] = Tiny(name, path, model)
        return made[name]

    return get


def copy_checkpoint(tiny: Tiny, dest: Path) -> Path:
    """A private copy to break (bad-checkpoint tests)."""
    shutil.copytree(tiny.path, dest)
    return dest


def flattened_batch(vocab: int, seed: int = 0):
    """The prompts, the prefill batch of all of them (ids, positions, slots), the decode tokens
    and the decode batch."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=gen) for n in PROMPT_LENS]
    nxt = torch.randint(0, vocab, (len(prompts),), generator=gen)
    prefill = (torch.cat(prompts),
               torch.cat([torch.arange(len(p)) for p in prompts]),
               torch.cat([torch.full((len(p),), slot) for slot, p in enumerate(prompts)]))
    decode = (nxt, torch.tensor([len(p) for p in prompts]), torch.arange(len(prompts)))
    return prompts, prefill, nxt, decode


def reference_logits(hf: torch.nn.Module, vocab: int, seed: int = 0):
    """transformers' logits for the prefill rows [sum(lens), vocab] and decode rows [seqs, vocab]."""
    prompts, _, nxt, _ = flattened_batch(vocab, seed)
    pre, dec = [], []
    with torch.no_grad():
        for p, t in zip(prompts, nxt):
            logits = hf(torch.cat([p, t[None]])[None]).logits[0]  # [len + 1, vocab]
            pre.append(logits[:-1])
            dec.append(logits[-1:])
    return torch.cat(pre), torch.cat(dec)


def distinct_pieces(layers: int) -> int:
    """Distinct compiled pieces of a decoder split at its attentions: the first (embedding up to
    the first attention), the middle ones (one layer's tail and the next one's head, identical)
    and the last (up to the logits)."""
    return min(layers + 1, 3)
