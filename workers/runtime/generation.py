"""Greedy decoding through kiln's batch contract: what `Orchestrator.generate` runs on each rank.

What generation needs from a model, beyond the batch contract (see kiln_model.py), is three
attributes, read by `limits_of`:

- `max_seqs`: KV-cache slots, so prompts decoded together (slots 0..max_seqs-1);
- `max_seq_len`: positions per slot, so prompt + new tokens;
- `vocab_size`: token ids are 0..vocab_size-1 (the logits' last dimension).

and `reset_cache()`, which generation calls first (a stale cache from an earlier batch would be
attended to where a new prompt is shorter).

One generation on one rank: prefill every prompt in one flattened batch (prompt i's tokens at
positions 0..len_i-1, all with seq_id i), take each prompt's last row of logits, then decode
max_new_tokens-1 steps of one token per sequence (`decode=True`, seq_ids 0..n-1). The next
token is the argmax of the full-vocab logits, which every rank holds alike, so every rank feeds
the same tokens without exchanging them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class GenerationLimits:
    """What a model can generate: read from its `max_seqs`, `max_seq_len`, `vocab_size`."""

    max_seqs: int
    """Prompts that can be decoded together (KV-cache slots)."""
    max_seq_len: int
    """Longest prompt + new tokens (positions per slot)."""
    vocab_size: int
    """Token ids are 0..vocab_size-1."""


@dataclass(frozen=True)
class GenerateResult:
    """New tokens per prompt, and how fast rank 0 made them."""

    tokens: list[list[int]]
    """tokens[i]: the max_new_tokens greedy tokens after prompt i."""
    prefill_seconds: float
    """The prefill forward (all prompts at once), up to its first tokens."""
    decode_seconds: float
    """The decode steps after it (one token per prompt each)."""

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all prompts over prefill + decode time."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def limits_of(model: Any) -> GenerationLimits:
    """The model's generation limits; a clear error naming what a model lacks."""
    values = {}
    for name in ("max_seqs", "max_seq_len", "vocab_size"):
        value = getattr(model, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"generate: the model ({type(model).__name__}) has no positive integer attribute {name!r} "
                f"(got {value!r}); generation needs max_seqs, max_seq_len and vocab_size "
                "(see kiln.workers.runtime.generation)")
        values[name] = value
    if not callable(getattr(model, "reset_cache", None)):
        raise ValueError(f"generate: the model ({type(model).__name__}) has no reset_cache() method")
    return GenerationLimits(**values)


def check_request(prompts: Any, max_new_tokens: Any, limits: GenerationLimits | None = None) -> None:
    """Refuse a request that cannot run, naming the prompt and the limit. Without `limits`,
    only what needs no model (types, empty prompts)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"prompt {i}: expected a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        for token in prompt:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                raise ValueError(f"prompt {i}: token id {token!r} is not a non-negative integer")
            if limits is not None and token >= limits.vocab_size:
                raise ValueError(f"prompt {i}: token id {token} is out of the vocabulary "
                                 f"(0..{limits.vocab_size - 1})")
    if limits is None:
        return
    if len(prompts) > limits.max_seqs:
        raise ValueError(f"{len(prompts)} prompts, but the model's KV cache holds {limits.max_seqs} "
                         "sequences (max_seqs): generate in smaller groups")
    for i, prompt in enumerate(prompts):
        if len(prompt) + max_new_tokens > limits.max_seq_len:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens + {max_new_tokens} new tokens exceed the "
                             f"model's max_seq_len {limits.max_seq_len}")


Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
"""step(input_ids [N], positions [N], seq_ids [N], decode) -> logits [N, vocab]."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def greedy_generate(step: Step, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    device: torch.device) -> GenerateResult:
    """Greedy tokens for `prompts` through `step` (the caller resets the KV cache first).

    Tokens stay on the device between steps; the host reads them once, at the end.
    """
    n = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [n]
    ids = torch.tensor([t for p in prompts for t in p], device=device)  # [T] = sum of lengths
    positions = torch.cat([torch.arange(len(p), device=device) for p in prompts])  # [T]
    slots = torch.arange(n, device=device)  # [n]
    seq_ids = torch.repeat_interleave(slots, lengths)  # [T]
    last_rows = torch.cumsum(lengths, 0) - 1  # [n]: each prompt's last token

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = step(ids, positions, seq_ids, False)  # [T, vocab]
        token = logits[last_rows].argmax(-1)  # [n]
        new = [token]
        _sync(device)
        t1 = time.perf_counter()
        for k in range(1, max_new_tokens):
            # the token produced k-1 steps after the prompt sits at position len + k - 1
            logits = step(token, lengths + (k - 1), slots, True)  # [n, vocab]
            token = logits.argmax(-1)  # [n]
            new.append(token)
        tokens = torch.stack(new, dim=1).tolist()  # [n, max_new_tokens]; syncs
    t2 = time.perf_counter()
    assert len(tokens) == n and all(len(t) == max_new_tokens for t in tokens)
    return GenerateResult(tokens=tokens, prefill_seconds=t1 - t0, decode_seconds=t2 - t1)
