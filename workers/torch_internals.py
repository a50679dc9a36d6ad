"""The one seam between kiln and torch's private APIs (Dynamo, Inductor, guards, functorch, pytree).

kiln reaches into torch where no public API does what it needs: binding a traced graph's inputs,
compiling a piece with Inductor into a relocatable artifact, loading one without a compiler run,
the grouped matmul of mixture-of-experts layers.
Every such use goes through this module, so a torch upgrade is checked in one place:
`PRIVATE_SYMBOLS` lists each private name kiln relies on, and tests/test_torch_internals.py
imports every one of them. kiln is tested on the torch releases in `TESTED_TORCH` and refuses
others at import (set KILN_ALLOW_UNTESTED_TORCH=1 to try one anyway, with a warning).

Heavy modules (Inductor) are imported when first used, not when this module is.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "OpOverload", "OpOverloadPacket", "tree_flatten", "tree_map", "tree_unflatten",
    "TESTED_TORCH", "check_torch_version",
]

TESTED_TORCH = ((2, 11), (2, 13))
"""Oldest and newest torch (major, minor) kiln is tested on: 2.11 on the GPUs, 2.13 on the CPU."""

# (module, attribute) of every private symbol used below; the seam test imports each one.
PRIVATE_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch._ops", "OpOverload"),
    ("torch._ops", "OpOverloadPacket"),
    ("torch.utils._pytree", "tree_flatten"),
    ("torch.utils._pytree", "tree_map"),
    ("torch.utils._pytree", "tree_unflatten"),
    ("torch._dynamo", "mark_dynamic"),
    ("torch._dynamo", "lookup_backend"),
    ("torch._dynamo.source", "LocalSource"),
    ("torch._dynamo.source", "TensorProperty"),
    ("torch._dynamo.source", "TensorPropertySource"),
    ("torch._dynamo.source", "GetItemSource"),
    ("torch._dynamo.source", "DictGetItemSource"),
    ("torch._guards", "TracingContext"),
    ("torch._dispatch.python", "enable_python_dispatcher"),
    ("torch._dispatch.python", "no_python_dispatcher"),
    ("torch._subclasses.fake_tensor", "unset_fake_temporarily"),
    ("torch._inductor", "standalone_compile"),
    ("torch._inductor", "CompiledArtifact"),
    ("torch._inductor", "config"),
    ("torch._inductor.compile_fx", "compile_fx"),
    ("torch._inductor.utils", "clear_caches"),
    ("torch._inductor.codecache", "torch_key"),
    ("torch._inductor.config", "save_config_portable"),
    ("torch._inductor.custom_graph_pass", "CustomGraphPass"),
    ("torch._inductor.runtime.triton_heuristics", "CachingAutotuner"),
    ("torch._inductor.runtime.triton_heuristics", "check_autotune_cache"),
    ("torch._inductor.runtime.runtime_utils", "cache_dir"),
    ("torch._functorch", "config"),
    ("torch", "_grouped_mm"),
    ("torch.utils._pytree", "treespec_dumps"),
    ("torch.utils._pytree", "treespec_loads"),
    ("torch._dynamo", "config"),
    ("torch._dynamo.utils", "counters"),
)

# Present in some builds only; each use has a fallback.
OPTIONAL_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch._inductor.codecache", "_precompile_header"),  # absent: no header precompilation
    ("torch._inductor", "config_comms"),  # absent: no collective-scheduling options to key
    # absent: that kind of autotuning is not counted (there is none to count in such a build)
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache"),
)


def _minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise RuntimeError(f"cannot read torch version {version!r}")
    return int(match[1]), int(match[2])


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse a torch outside TESTED_TORCH (warn instead with KILN_ALLOW_UNTESTED_TORCH=1)."""
    lo, hi = TESTED_TORCH
    if lo <= _minor(version) <= hi:
        return
    message = (f"kiln is tested on torch {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}, but torch {version} is "
               "installed: kiln uses Dynamo's and Inductor's private APIs, which change between releases")
    if os.environ.get("KILN_ALLOW_UNTESTED_TORCH") == "1":
        warnings.warn(message + " (KILN_ALLOW_UNTESTED_TORCH=1: trying anyway)", RuntimeWarning, stacklevel=2)
        return
    raise ImportError(message + "; install a tested torch, or set KILN_ALLOW_UNTESTED_TORCH=1 to try anyway")


check_torch_version()


# ---- Dynamo -------------------------------------------------------------------------------------


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Make `tensor`'s dimension `dim` symbolic in the next trace."""
    torch._dynamo.mark_dynamic(tensor, dim)


def lookup_backend(name: str) -> Callable[..., Any]:
    """A registered torch.compile backend by name."""
    return torch._dynamo.lookup_backend(name)


def dynamo_sources() -> tuple[type, type, type]:
    """(LocalSource, TensorProperty, TensorPropertySource): how Dynamo says where a graph input
    came from (a forward argument, or a property of one such as its size)."""
    from torch._dynamo.source import LocalSource, TensorProperty, TensorPropertySource

    return LocalSource, TensorProperty, TensorPropertySource


def dynamo_item_sources() -> tuple[type, type]:
    """(GetItemSource, DictGetItemSource): an item of a traced frame's local, as Dynamo names
    an argument that reached the frame through its *args (by index) or **kwargs (by key)."""
    from torch._dynamo.source import DictGetItemSource, GetItemSource

    return GetItemSource, DictGetItemSource


def tracing_fake_mode() -> Any:
    """The fake-tensor mode of the trace in progress (inside a Dynamo backend)."""
    return torch._guards.TracingContext.get().fake_mode


def traced_code_files() -> set[str]:
    """Source files whose code the trace in progress inlined ({} on a torch that does not say)."""
    traced = getattr(torch._guards.TracingContext.get(), "traced_code", None) or []
    return {code.co_filename for code in traced}


def python_dispatcher() -> contextlib.AbstractContextManager:
    """The Python dispatcher, which symbolic shapes need while walking a graph with fake tensors."""
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()


@contextlib.contextmanager
def real_tensors() -> Iterator[None]:
    """Real tensors and kernels in the block, inside a backend's fake-tensor walk: no fake mode
    and no Python dispatcher (for running a freshly compiled graph on real inputs)."""
    from torch._dispatch.python import no_python_dispatcher
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), no_python_dispatcher():
        yield


# ---- Kernels ------------------------------------------------------------------------------------

GROUPED_MM_SINCE = (2, 11)
"""The first torch whose `torch._grouped_mm` kiln relies on (signature and int32 offsets)."""
GROUPED_MM_FAST_CAPABILITIES = (9, 10)
"""CUDA compute capability majors (sm90, sm100) where torch runs `_grouped_mm` in bf16 as one
kernel that reads the offsets on the device; elsewhere it falls back to a loop that copies the
offsets to the host (a sync, which a CUDA graph cannot capture)."""


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]..offs[g] of `a` [M, K] times b[g] ([G, K, N], column-major in its last two
    dimensions) for every group g: [M, N]. `offs` [G] int32 on a's device, cumulative row counts
    (offs[-1] == M); a group may be empty."""
    return torch._grouped_mm(a, b, offs=offs)


def grouped_mm_available() -> bool:
    return _minor(torch.__version__) >= GROUPED_MM_SINCE and hasattr(torch, "_grouped_mm")


_FAST_DEVICES: dict[int, bool] = {}


def grouped_mm_fast(x: torch.Tensor) -> bool:
    """Whether `grouped_mm` runs on x's device and dtype as one kernel without a host sync
    (CUDA sm90/sm100, bfloat16, a torch that has it)."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and grouped_mm_available()):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _FAST_DEVICES:
        _FAST_DEVICES[index] = torch.cuda.get_device_capability(index)[0] in GROUPED_MM_FAST_CAPABILITIES
    return _FAST_DEVICES[index]


# ---- Inductor -----------------------------------------------------------------------------------


def import_compiler() -> None:
    """Import what a compile or a load of kiln's artifacts needs from Dynamo and Inductor (the
    compile_fx stack, its lowerings and code cache, Triton's runtime heuristics on CUDA builds)."""
    for name in ("torch._dynamo", "torch._inductor.config", "torch._inductor.compile_fx",
                 "torch._inductor.codecache", "torch._inductor.select_algorithm"):
        importlib.import_module(name)
    try:
        importlib.import_module("torch._inductor.runtime.triton_heuristics")
    except ImportError:  # a build without Triton: nothing autotunes at run time
        pass


def inductor_config() -> Any:
    """torch._inductor.config (a module with `patch()` and attribute options)."""
    return importlib.import_module("torch._inductor.config")


def functorch_config() -> Any:
    """torch._functorch.config (AOTAutograd's options, with `patch()`)."""
    return importlib.import_module("torch._functorch.config")


def compile_fx(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Inductor's own torch.compile backend."""
    from torch._inductor.compile_fx import compile_fx as inductor_compile_fx

    return inductor_compile_fx(gm, example_inputs)


def standalone_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, dynamic_shapes: str,
                       config_patches: dict[str, Any]) -> Any:
    """Compile one graph with Inductor outside torch.compile; the result can `save()` itself."""
    return torch._inductor.standalone_compile(gm, list(example_inputs), dynamic_shapes=dynamic_shapes,
                                              options={"config_patches": config_patches})


def load_artifact(path: str) -> Callable[..., Any]:
    """Load an Inductor artifact saved with format="unpacked"."""
    return torch._inductor.CompiledArtifact.load(path=path, format="unpacked")


def clear_inductor_caches() -> None:
    """Forget Inductor's in-memory caches (so a changed cache directory takes effect)."""
    from torch._inductor.utils import clear_caches

    clear_caches()


def inductor_source_key() -> str:
    """Inductor's own key for the torch source it was built from."""
    from torch._inductor.codecache import torch_key

    return torch_key().hex()[:32]


def inductor_portable_config() -> dict[str, dict[str, Any]]:
    """Inductor's resolved options, the way its own FX graph cache keys itself.

    Every option of torch._inductor.config (and of config_comms, where the build has it), set
    in code, through a TORCHINDUCTOR_* variable or left at its default, private ones included,
    less those Inductor's cache leaves out itself (`_cache_config_ignore_prefix`: trace and
    debug output, compile_threads, custom-pass objects, the cache switches), plus
    `trace.provenance_tracking_level`, which that cache adds back. Values as the config holds
    them (not necessarily JSON).
    """
    config = inductor_config()
    options = _portable_options(config)
    # Absent from some builds (torch 2.11 has it, but keep the key computable where it does not).
    options["trace.provenance_tracking_level"] = getattr(config.trace, "provenance_tracking_level", None)
    out = {"config": options}
    try:
        comms = importlib.import_module("torch._inductor.config_comms")
    except ImportError:
        return out
    out["config_comms"] = _portable_options(comms)
    return out


def _portable_options(module: Any) -> dict[str, Any]:
    """`module.save_config_portable(...)` with the arguments this torch accepts: private options
    included where it can say so (torch 2.13), read-only values where it offers them (2.13: no
    deep copies); torch 2.11 has neither argument."""
    params = inspect.signature(module.save_config_portable).parameters
    kwargs = {name: value for name, value in (("ignore_private_configs", False), ("readonly_values", True))
              if name in params}
    return dict(module.save_config_portable(**kwargs))


def custom_graph_pass_base() -> type:
    """Inductor's base class for custom passes (its uuid() enters Inductor's cache key)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass


@contextlib.contextmanager
def skip_header_precompile() -> Iterator[None]:
    """Load C++ kernels without Inductor's header precompilation step.

    Inductor preprocesses its C++ header (a compiler run, seconds on a small CPU) before it looks
    for a kernel library that already exists. Turning the setting off would change the kernels'
    build key and force a rebuild, so the step itself is stubbed for the block. Builds without
    header precompilation have nothing to stub.
    """
    from torch._inductor import codecache

    original = getattr(codecache, "_precompile_header", None)
    if original is None:
        yield
        return
    codecache._precompile_header = lambda header, *args, **kwargs: header
    try:
        yield
    finally:
        codecache._precompile_header = original


def trusting_cpu_isa() -> contextlib.AbstractContextManager:
    """Load C++ kernels without Inductor's CPU vector-ISA probe (a test build, then a dlopen in
    a child process, ~1 s, once per process). The probe's library is built in the cache
    directory of the moment, so only the artifact compiled first in a process carries it, and a
    warm process (or a bundle's) whose first load is another artifact would run the C++
    compiler. `cpp.vec_isa_ok=True` takes the ISAs the CPU reports as buildable: what the
    compile's real probe found on the machine this cache key (which holds ATen's CPU capability)
    was built for. Only the load sees it; the option never enters a key from here."""
    return inductor_config().patch({"cpp.vec_isa_ok": True})


@contextlib.contextmanager
def without_torch_compile_caches() -> Iterator[None]:
    """Turn off Inductor's FX graph cache and AOTAutograd's cache for the block, through their
    own `patch()` (so the previous values come back exactly, whatever they were)."""
    with inductor_config().patch(fx_graph_cache=False), functorch_config().patch(enable_autograd_cache=False):
        yield


# ---- Keeping a trace -------------------------------------------------------------------


def treespec_dumps(spec: Any) -> str:
    """A pytree spec as JSON text (raises for a node type registered without a serialized name)."""
    from torch.utils._pytree import treespec_dumps as dumps

    return dumps(spec)


def treespec_loads(text: str) -> Any:
    from torch.utils._pytree import treespec_loads as loads

    return loads(text)


def dynamo_portable_config() -> dict[str, Any]:
    """Dynamo's resolved options (what changes how it traces), as its config module saves them."""
    return _portable_options(importlib.import_module("torch._dynamo.config"))


def dynamo_graphs_traced() -> int:
    """How many graphs Dynamo has traced in this process (its own counter, which full-graph
    tracing keeps too; its frame counter it does not)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- Autotuning ---------------------------------------------------------------------------------
#
# Inductor tunes in two places. While compiling, max-autotune benchmarks template choices
# (select_algorithm); the winner is baked into the generated code, so it travels with the
# artifact. At a kernel's first launch, Triton's runtime autotuner (CachingAutotuner) benchmarks
# every config of a pointwise or reduction kernel and saves the winner as a `.best_config` file
# beside the kernel's source file (AutotuneCache, keyed by that file's directory and name). kiln
# runs each CUDA artifact once while its build directory is still there, so those files are
# packed with it; on load, `autotune_results_under` makes the loaded kernels look for them where
# they were unpacked.

# (owner, attribute) of every method counted as one autotuning benchmark; optional ones may be absent.
_AUTOTUNE_ENTRIES = (
    ("torch._inductor.runtime.triton_heuristics", "CachingAutotuner", "benchmark_all_configs", True),
    ("torch._inductor.runtime.triton_heuristics", "CachingAutotuner", "coordinate_descent_tuning", False),
    ("torch._inductor.select_algorithm", "AlgorithmSelectorCache", "benchmark_choices", False),
)
_autotune_lock = threading.Lock()
_autotune_calls = 0
_autotune_installed: list[tuple[type, str, Any]] = []  # (class, name, original descriptor)


class AutotuneCount:
    """What `count_autotune_benchmarks` yields: `calls` so far inside its block."""

    def __init__(self) -> None:
        self._start = _autotune_calls
        self._end: int | None = None

    @property
    def calls(self) -> int:
        return (self._end if self._end is not None else _autotune_calls) - self._start


def _counting(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def counted(*args: Any, **kwargs: Any) -> Any:
        global _autotune_calls
        with _autotune_lock:
            _autotune_calls += 1
        return original(*args, **kwargs)

    return counted


def install_autotune_counter(*, everything: bool = False) -> None:
    """Wrap Inductor's autotuning entry points (each once per process) so that each call counts.

    The runtime autotuner's module is imported here; max-autotune's (select_algorithm, seconds
    to import) only with `everything`, else only if something imported it already: compile_graph
    asks for everything just before Inductor compiles (which imports it anyway), so a warm start
    pays for that import where it would anyway, in its first load. Installed for good: a wrapper
    only adds one to a counter, and removing it while another counter's block is open would lose
    that block's calls. A required entry point missing from this torch is an error naming it
    (the counts would silently read 0)."""
    import sys

    with _autotune_lock:
        done = {(owner, attr) for owner, attr, _ in _autotune_installed}
        for module_name, owner_name, attr, required in _AUTOTUNE_ENTRIES:
            if not (required or everything or module_name in sys.modules):
                continue
            try:
                owner = getattr(importlib.import_module(module_name), owner_name)
                descriptor = inspect.getattr_static(owner, attr)
            except (ImportError, AttributeError):
                if required:
                    raise RuntimeError(f"cannot count autotuning: {module_name}.{owner_name}.{attr} is gone "
                                       "from this torch") from None
                continue
            if (owner, attr) in done:
                continue
            if isinstance(descriptor, classmethod):
                wrapped: Any = classmethod(_counting(descriptor.__func__))
            elif isinstance(descriptor, staticmethod):
                wrapped = staticmethod(_counting(descriptor.__func__))
            else:
                wrapped = _counting(descriptor)
            setattr(owner, attr, wrapped)
            _autotune_installed.append((owner, attr, descriptor))


def autotune_entry_points() -> list[tuple[type, str, Any]]:
    """(class, attribute, torch's own function) of every counted entry point, once installed."""
    return [(owner, attr, getattr(d, "__func__", d)) for owner, attr, d in _autotune_installed]


@contextlib.contextmanager
def count_autotune_benchmarks() -> Iterator[AutotuneCount]:
    """Count Inductor's autotuning benchmarks in the block: each time the runtime autotuner
    benchmarks a kernel's configs, runs coordinate descent, or max-autotune benchmarks a
    template's choices (all threads of the process, not only this one)."""
    install_autotune_counter()
    count = AutotuneCount()
    try:
        yield count
    finally:
        count._end = _autotune_calls


def relocated_kernel_path(filename: str | None, root: str) -> str | None:
    """Where a kernel source file named `filename` by some compile is under cache dir `root`:
    itself if it is already there, else `root/<its folder's name>/<its name>` (Inductor's layout)."""
    if filename is None:
        return None
    if os.path.abspath(filename).startswith(os.path.join(os.path.abspath(root), "")):
        return filename
    return os.path.join(root, os.path.basename(os.path.dirname(filename)), os.path.basename(filename))


@contextlib.contextmanager
def autotune_results_under(root: str) -> Iterator[None]:
    """Make kernels loaded in the block look for their saved autotuning results under `root`.

    The runtime autotuner looks for a kernel's `.best_config` beside the kernel's source file.
    A kernel loaded from the cache's own pickle (the statically launched ones) still carries the
    source path of the compile, in a build directory long gone; Inductor's cache layout puts
    that file at `<cache dir>/<2 chars>/<name>.py`, so the same two components under `root`
    (where the artifact was unpacked, results included) are where its results are now.
    """
    from torch._inductor.runtime import triton_heuristics

    original = triton_heuristics.check_autotune_cache

    def relocated(*args: Any, **kwargs: Any) -> Any:
        # (configs, filename, inductor_meta), positionally or by name, in 2.11 and 2.13 alike.
        if "filename" in kwargs:
            kwargs["filename"] = relocated_kernel_path(kwargs["filename"], root)
        elif len(args) > 1:
            args = (args[0], relocated_kernel_path(args[1], root), *args[2:])
        return original(*args, **kwargs)

    triton_heuristics.check_autotune_cache = relocated
    try:
        yield
    finally:
        triton_heuristics.check_autotune_cache = original
