"""The two mode enums of `CompilationConfig`: `CompilationLevel` and `CUDAGraphMode`.

Kept apart from `workers/config.py` so that dispatch code can import them alone. No torch
import: they are pure bookkeeping, and `kiln config` must start fast.
"""

from __future__ import annotations

import enum
from typing import Any


class CUDAGraphMode(enum.Enum):
    """How kiln captures CUDA graphs.

    The last two members are pairs (decode routine, mixed routine): a batch of pure decode
    requests runs with the first mode, any other batch with the second. The plain members apply
    to both routines. Values order the plain modes NONE < PIECEWISE < FULL, which is what
    `max_cudagraph_mode` relies on.
    """

    NONE = 0
    """No CUDA graphs: every batch runs eagerly (or as compiled code without graphs)."""
    PIECEWISE = 1
    """One graph per compiled piece; splitting ops (attention) run eagerly between them."""
    FULL = 2
    """One graph for the whole forward, splitting ops included."""
    FULL_DECODE_ONLY = (2, 0)
    """FULL for pure-decode batches, no graphs for mixed batches."""
    FULL_AND_PIECEWISE = (2, 1)
    """FULL for pure-decode batches, PIECEWISE for mixed batches."""

    @classmethod
    def parse(cls, value: Any) -> CUDAGraphMode:
        """The member named `value` (any case), or `value` itself if it already is a member.

        Anything else (ints included: the tuple values are an implementation detail) raises a
        ValueError listing the valid names.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            member = cls.__members__.get(value.strip().upper())
            if member is not None:
                return member
        valid = ", ".join(cls.__members__)
        raise ValueError(f"invalid CUDA graph mode {value!r}; valid modes (any case): {valid}")

    def separate_routine(self) -> bool:
        """Whether decode and mixed batches use different modes (the mode is a pair)."""
        return isinstance(self.value, tuple)

    def decode_mode(self) -> CUDAGraphMode:
        """The mode used for pure-decode batches."""
        return CUDAGraphMode(self.value[0]) if self.separate_routine() else self

    def mixed_mode(self) -> CUDAGraphMode:
        """The mode used for mixed (prefill or prefill+decode) batches."""
        return CUDAGraphMode(self.value[1]) if self.separate_routine() else self

    def max_cudagraph_mode(self) -> CUDAGraphMode:
        """The strongest plain mode among the components (FULL > PIECEWISE > NONE)."""
        return CUDAGraphMode(max(self.decode_mode().value, self.mixed_mode().value))

    def has_full_cudagraphs(self) -> bool:
        """Whether any routine captures full graphs."""
        return self.max_cudagraph_mode() is CUDAGraphMode.FULL

    def has_piecewise_cudagraphs(self) -> bool:
        """Whether any routine captures piecewise graphs."""
        return CUDAGraphMode.PIECEWISE in (self.decode_mode(), self.mixed_mode())

    def requires_piecewise_compilation(self) -> bool:
        """Whether the graph must be split (piecewise graphs need pieces to capture)."""
        return self.has_piecewise_cudagraphs()


class CompilationLevel(enum.IntEnum):
    """How much of the model torch.compile takes over."""

    NO_COMPILATION = 0
    """Eager PyTorch."""
    DYNAMO_AS_IS = 1
    """torch.compile with `backend`, Dynamo's usual guards and recompiles."""
    DYNAMO_ONCE = 2
    """Trace once with Dynamo and never recompile."""
    PIECEWISE = 3
    """The kiln backend: split at the splitting ops, compile the pieces, CUDA graphs."""

    @classmethod
    def parse(cls, value: Any) -> CompilationLevel:
        """A member from itself, its int value or its name in any case; else a ValueError."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            text = value.strip()
            if text.upper() in cls.__members__:
                return cls.__members__[text.upper()]
            if text.isdigit():
                value = int(text)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        valid = ", ".join(f"{m.value} ({m.name})" for m in cls)
        raise ValueError(f"level: invalid compilation level {value!r}; valid: {valid}")
