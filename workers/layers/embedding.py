"""Vocab-parallel embedding and LM head, for any vocabulary size.

The vocabulary is padded up to a multiple of the tensor-parallel size; rank r holds rows
[r * V_r, (r + 1) * V_r) of the padded vocabulary (V_r = padded / tp). Padding rows are zero and
never read from the checkpoint (the last rank's slice is shorter, or empty).

- Embedding: each rank looks up the ids that fall in its rows (others give zero rows), then an
  all-reduce sums the ranks' partial results. The rank's first row is a buffer, not a Python
  constant, so the traced graph is the same on every rank.
- LM head: each rank computes logits for its rows [N, V_r]; an all-gather puts the ranks'
  blocks side by side and the padding columns are cut off: full logits [N, vocab] on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from kiln.workers.layers.collectives import all_gather, all_reduce
from kiln.workers.layers.parallel_state import tp_rank, tp_world_size
from kiln.workers.layers.shards import Placed, WeightSlice


class VocabPartition:
    """This rank's rows of the padded vocabulary."""

    def __init__(self, vocab: int, tp: int, rank: int):
        self.vocab, self.tp = vocab, tp
        self.padded = -(-vocab // tp) * tp
        self.local = self.padded // tp
        self.start = rank * self.local
        self.real = max(0, min(self.local, vocab - self.start))
        """Rows of this rank that are real tokens (the rest is padding)."""

    def weight_slice(self, source: str, hidden: int) -> WeightSlice:
        # Possibly empty (a rank of padding rows only): it still names the tensor, so every rank
        # checks the same checkpoint tensors.
        return WeightSlice(source, (self.vocab, hidden), 0, min(self.start, self.vocab), self.real)


class VocabParallelEmbedding(nn.Module):
    """ids [N] -> [N, hidden]."""

    def __init__(self, vocab: int, hidden: int, source: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.part = VocabPartition(vocab, tp_world_size(), tp_rank())
        self.source, self.hidden = source, hidden
        # zeros: the padding rows stay zero; the real rows are filled by the loader
        self.weight = nn.Parameter(torch.zeros(self.part.local, hidden, dtype=dtype, device=device),
                                   requires_grad=False)
        if self.part.tp > 1:
            self.register_buffer("vocab_start", torch.tensor(self.part.start, device=device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.part.tp == 1:
            return torch.nn.functional.embedding(input_ids, self.weight)  # [N, hidden]
        local_ids = input_ids - self.vocab_start  # [N]
        mine = (local_ids >= 0) & (local_ids < self.part.local)  # [N]
        rows = torch.nn.functional.embedding(torch.where(mine, local_ids, 0), self.weight)  # [N, hidden]
        return all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))

    def weight_slices(self) -> Iterator[Placed]:
        yield self.weight, self.part.weight_slice(self.source, self.hidden)


class ParallelLMHead(nn.Module):
    """x [N, hidden] -> logits [N, vocab], full vocabulary on every rank."""

    def __init__(self, vocab: int, hidden: int, source: str, dtype: torch.dtype, device: torch.device,
                 tied: VocabParallelEmbedding | None = None):
        super().__init__()
        self.part = VocabPartition(vocab, tp_world_size(), tp_rank())
        self.source, self.hidden = source, hidden
        self.tied = tied is not None
        if tied is not None:  # the embedding's rows of the same vocabulary partition
            self.weight = tied.weight
        else:
            self.weight = nn.Parameter(torch.zeros(self.part.local, hidden, dtype=dtype, device=device),
                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        logits = torch.nn.functional.linear(x, self.weight)  # [N, V_r]
        if self.part.tp > 1:
            blocks = all_gather(logits)  # [tp * N, V_r]: rank r's block at rows r*N..(r+1)*N
            logits = blocks.view(self.part.tp, n, self.part.local).transpose(0, 1).reshape(n, self.part.padded)
        if self.part.padded != self.part.vocab:
            logits = logits[:, :self.part.vocab]
        return logits  # [N, vocab]

    def weight_slices(self) -> Iterator[Placed]:
        if not self.tied:
            yield self.weight, self.part.weight_slice(self.source, self.hidden)
