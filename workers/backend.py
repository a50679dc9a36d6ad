"""What `level` means: eager, torch.compile as is, trace once, or kiln's piecewise backend.

`compile_forward(module, config, …)` returns the callable that runs the module's forward at
the configured level; `kiln_backend` is the `torch.compile(model, backend="kiln")` entry point
(registered under `torch_dynamo_backends`), which uses a default config and cache root.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from workers.compile_modes import CompilationLevel
from workers.compiler import PiecewiseBackend, inductor_config_patches
from workers.config import CompilationConfig
from workers.custom_ops import check_custom_op_names
from workers.record import CompileRecord
from workers.trace_once import TraceOnce


def _lookup_backend(name: str) -> Callable[..., Any]:
    try:
        return torch._dynamo.lookup_backend(name)
    except Exception as exc:
        raise ValueError(f"backend: unknown torch.compile backend {name!r} ({exc})") from None


def _dynamo_backend(config: CompilationConfig) -> Callable[..., Any]:
    """The torch.compile backend of levels 1 and 2. With Inductor, the config's Inductor options
    and passes apply as they do at level 3; another backend cannot take them, so setting them
    is an error rather than a silent no-op."""
    if config.backend != "inductor":
        # (pass_config's switches, on by default, simply have no Inductor to run in.)
        given = [name for name in ("inductor_compile_config", "inductor_passes") if getattr(config, name)]
        if given:
            raise ValueError(f"{', '.join(given)}: apply to Inductor only, but backend is {config.backend!r}")
        return _lookup_backend(config.backend)
    patches = inductor_config_patches(config)
    if not patches:
        return _lookup_backend("inductor")

    def inductor_with_config(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        with inductor_config.patch(patches):
            return compile_fx(gm, example_inputs)

    return inductor_with_config


def compile_forward(
    module: torch.nn.Module,
    config: CompilationConfig,
    *,
    store: Any = None,
    rank: int = 0,
    record: CompileRecord | None = None,
) -> tuple[Callable[..., Any], PiecewiseBackend | None]:
    """The module's forward at `config.level`, plus the piecewise backend at level 3.

    Levels 2 and 3 trace on their first call (see TraceOnce); level 1 is plain torch.compile
    with its usual guards and recompiles; level 0 is the module itself.
    """
    check_custom_op_names(config)
    level = config.level
    if level == CompilationLevel.NO_COMPILATION:
        return module, None
    if level == CompilationLevel.DYNAMO_AS_IS:
        return torch.compile(module, backend=_dynamo_backend(config)), None
    if level == CompilationLevel.DYNAMO_ONCE:
        return TraceOnce(module, _dynamo_backend(config)), None
    backend = PiecewiseBackend(config, store, rank=rank, record=record)
    return TraceOnce(module, backend), backend


def kiln_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """`torch.compile(model, backend="kiln")`: piecewise compile with the default config, cached
    under $KILN_CACHE_ROOT (or ~/.cache/kiln)."""
    from cache import CacheStore

    config = CompilationConfig()
    return PiecewiseBackend(config, CacheStore(config.cache_dir or None))(gm, example_inputs)
