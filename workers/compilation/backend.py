"""What `level` means: eager, torch.compile as is, trace once, or kiln's piecewise backend.

`compile_forward(module, config, …)` returns the callable that runs the module's forward at
the configured level (KilnModel and kiln.compile use it); `kiln_backend` is the
`torch.compile(model, backend="kiln")` entry point (registered under `torch_dynamo_backends`),
which uses a default config and cache root, and `backend(config, cache_root)` one with yours.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from kiln.workers import torch_internals
from kiln.workers.config.modes import CompilationLevel
from kiln.workers.compilation.piecewise_backend import PiecewiseBackend, inductor_config_patches
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import check_custom_op_names
from kiln.workers.compilation.record import CompileRecord
from kiln.workers.compilation.cached_trace import TraceCache
from kiln.workers.compilation.trace_once import TraceOnce


def _lookup_backend(name: str) -> Callable[..., Any]:
    try:
        return torch_internals.lookup_backend(name)
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
        with torch_internals.inductor_config().patch(patches):
            return torch_internals.compile_fx(gm, example_inputs)

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

    Levels 2 and 3 trace on their first call (see TraceOnce); level 3 with a cache store keeps
    that trace and a later start with the same model, call and config skips Dynamo
    (cached_trace.py); level 1 is plain torch.compile
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
    # debug_dump_path asks for the traced graphs on disk: only a trace writes them.
    keep = store is not None and trace_cache_enabled() and not config.debug_dump_path
    cache = TraceCache(store, backend.config_hash) if keep else None
    return TraceOnce(module, backend, cache=cache), backend


def trace_cache_enabled() -> bool:
    """Whether level 3 keeps its Dynamo trace in the cache (KILN_TRACE_CACHE=0 turns it off:
    every start traces, as before)."""
    return os.environ.get("KILN_TRACE_CACHE", "1") != "0"


def backend(config: CompilationConfig | None = None,
            cache_root: str | os.PathLike[str] | None = None) -> Callable[..., Any]:
    """A torch.compile backend that compiles piecewise with `config` (default: the default
    config), cached under `cache_root` (default: config.cache_dir, else $KILN_CACHE_ROOT or
    ~/.cache/kiln): `torch.compile(model, backend=kiln.backend(config, root))`."""
    from kiln.cache import CacheStore

    config = config if config is not None else CompilationConfig()
    if config.level != CompilationLevel.PIECEWISE:
        raise ValueError(f"level: kiln.backend compiles piecewise (level 3), got level {int(config.level)}; "
                         "use kiln.compile or KilnModel for other levels")
    check_custom_op_names(config)
    root = cache_root if cache_root is not None else (config.cache_dir or None)

    def kiln_piecewise(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        # One backend per graph Dynamo hands over (a recompile is a new graph, new pieces).
        return PiecewiseBackend(config, CacheStore(root))(gm, example_inputs)

    return kiln_piecewise


def kiln_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """`torch.compile(model, backend="kiln")`: piecewise compile with the default config (split
    at attention: kiln's op and torch's SDPA), cached under $KILN_CACHE_ROOT (or ~/.cache/kiln)."""
    return backend()(gm, example_inputs)
