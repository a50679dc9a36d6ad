"""Run-time side of a split graph: one runner per piece, picking an artifact by batch size.

A compiled piece holds the artifact for the symbolic batch size and, optionally, artifacts for
static sizes (`compile_sizes`); a batch size with its own artifact uses it, any other uses the
symbolic one. Loaded Inductor artifacts do not check shapes, so this dispatch is what decides
which code runs for which size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def size_index(example_inputs: Sequence[Any]) -> int | None:
    """Index of the first input that is the batch symbol itself (not an expression of it such
    as 4*s0): the batch size a piece receives at run time, which picks its artifact."""
    for i, value in enumerate(example_inputs):
        if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
            return i
    return None


class PieceRunner:
    """Calls one piece: an eager splitting op, or compiled artifacts chosen by batch size."""

    def __init__(
        self,
        index: int,
        general: Callable[..., Any],
        *,
        returns_single: bool,
        is_splitting: bool,
        size_arg: int | None = None,
        by_size: dict[int, Callable[..., Any]] | None = None,
    ):
        self.index = index
        self.general = general
        self.returns_single = returns_single
        self.is_splitting = is_splitting
        self.size_arg = size_arg
        self.by_size = dict(by_size or {})
        # A wrapper (CUDA graphs) may interpose on the call; see workers/cudagraphs.py.
        self.call: Callable[..., Any] = self.run

    def run(self, *args: Any) -> Any:
        fn = self.general
        if self.by_size and self.size_arg is not None:
            fn = self.by_size.get(args[self.size_arg], self.general)
        return fn(*args)

    def __call__(self, *args: Any) -> Any:
        out = self.call(*args)
        return out[0] if self.returns_single else out

    def __repr__(self) -> str:
        kind = "splitting" if self.is_splitting else f"compiled sizes={sorted(self.by_size)}+sym"
        return f"PieceRunner({self.index}, {kind})"
