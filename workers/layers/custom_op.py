"""`CustomOp`, the base of layers with two implementations, and eager fast paths for splitting ops.

A `CustomOp` layer's custom path is an opaque op (Inductor cannot look inside) and its native
path is plain torch code that Inductor fuses. Which one runs is fixed when the layer is built,
from the `CompilationConfig` active at that time (`building_with(config)`).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from kiln.workers.torch_internals import OpOverloadPacket

if TYPE_CHECKING:
    from kiln.workers.config import CompilationConfig

# ---------------------------------------------------------------------------------------------
# Eager fast paths for splitting ops

_EAGER_IMPLS: dict[object, Callable[..., torch.Tensor]] = {}


def register_eager_impl(op: OpOverloadPacket, impl: Callable[..., torch.Tensor]) -> None:
    """Let eagerly run splitting pieces call `impl` instead of dispatching `op`."""
    _EAGER_IMPLS[op] = impl
    _EAGER_IMPLS[op.default] = impl


def eager_impl(target: object) -> Callable[..., torch.Tensor] | None:
    return _EAGER_IMPLS.get(target)


# ---------------------------------------------------------------------------------------------
# The config active while a model is built

@dataclass
class CustomOpCounts:
    """How many layers of each custom op a model build put on each path (for the report)."""

    enabled: collections.Counter[str] = field(default_factory=collections.Counter)
    """Custom op name → instances built on the custom path (its own opaque kernel)."""
    disabled: collections.Counter[str] = field(default_factory=collections.Counter)
    """Custom op name → instances built on the native path (torch code Inductor fuses)."""

    def record(self, name: str, enabled: bool) -> None:
        (self.enabled if enabled else self.disabled)[name] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"enabled": dict(self.enabled), "disabled": dict(self.disabled)}


@dataclass
class _Build:
    config: CompilationConfig | None
    counts: CustomOpCounts


_BUILD = threading.local()


@contextlib.contextmanager
def building_with(config: CompilationConfig | None) -> Iterator[CustomOpCounts]:
    """Make `config` decide custom-op paths for the layers built inside this block; yields the
    counts of what was built on which path."""
    previous = getattr(_BUILD, "current", None)
    _BUILD.current = _Build(config, CustomOpCounts())
    try:
        yield _BUILD.current.counts
    finally:
        _BUILD.current = previous


def current_build_config() -> CompilationConfig | None:
    build = getattr(_BUILD, "current", None)
    return build.config if build is not None else None


class CustomOp(nn.Module):
    """A layer with a custom path (an opaque op) and a native path (torch code Inductor fuses).

    Subclasses set `op_name` and implement `forward_custom` and `forward_native` with the same
    signature. The choice is made once, at construction, from the config active in
    `building_with(...)`; without one the custom path runs (no Inductor assumed).
    """

    op_name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[CustomOp]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.op_name:
            assert cls.op_name not in CustomOp.registry, f"custom op {cls.op_name!r} defined twice"
            CustomOp.registry[cls.op_name] = cls

    def __init__(self) -> None:
        super().__init__()
        build = getattr(_BUILD, "current", None)
        config = build.config if build is not None else None
        self.use_custom = True if config is None else config.custom_op_enabled(self.op_name)
        if build is not None:
            build.counts.record(self.op_name, self.use_custom)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.use_custom:
            return self.forward_custom(*args)
        return self.forward_native(*args)

    def forward_custom(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_native(self, *args: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"path={'custom' if self.use_custom else 'native'}"


def check_custom_op_names(config: CompilationConfig) -> None:
    """Every `+name`/`-name` in config.custom_ops must name a registered CustomOp."""
    unknown = [
        entry
        for entry in config.custom_ops
        if entry[:1] in "+-" and entry[1:] not in CustomOp.registry
    ]
    if unknown:
        known = ", ".join(sorted(CustomOp.registry)) or "none"
        raise ValueError(f"custom_ops: unknown op(s) {unknown}; known custom ops: {known}")
