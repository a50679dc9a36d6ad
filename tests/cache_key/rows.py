"""The rows of the invalidation matrix: one change each, and what it must do to the key.

A row that `enters` must move exactly the leaves `moves` of the key factors (and so give a new
key and no hit); one that does not must move nothing (the same key and a hit). A change runs in
this process (`change`, a context manager on the Scene, with an optional `base` around both
sides) or in a fresh child process's environment (`env`), since torch reads TORCHINDUCTOR_*,
ATEN_CPU_CAPABILITY and OMP_NUM_THREADS when it is imported.
"""

from __future__ import annotations

import collections
import contextlib
import platform
import shutil
import socket
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import pytest
import torch

import kiln
from kiln.workers.compilation import factors as kiln_factors
from tests.cache_key.scene import MODEL_PACKAGE, Scene, copy_workers_tree, quiet_config

Change = Callable[[Scene], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class Row:
    name: str
    enters: bool
    moves: frozenset[tuple[str, ...]] = frozenset()
    change: Change | None = None
    base: Change | None = None
    env: dict[str, str] | None = None
    config_field: str | None = None
    """The CompilationConfig field (or "pass_config.<flag>") this row is about."""
    move_root: bool = False
    """Open the changed side's entry in a copy of the cache root."""


def leaf(*path: str) -> frozenset[tuple[str, ...]]:
    return frozenset({path})


CONFIG_HASH = leaf("config_hash")


def identity_pass(graph):
    """An inductor pass that changes nothing (its source is what the config hash records)."""
    return graph


# ---- changes --------------------------------------------------------------------------------


@contextlib.contextmanager
def config(scene: Scene, **fields) -> Iterator[None]:
    old, scene.config = scene.config, quiet_config(**fields)
    try:
        yield
    finally:
        scene.config = old


@contextlib.contextmanager
def runtime_state(scene: Scene) -> Iterator[None]:
    """What a run derives on its config: capture sizes fixed, compile sizes expanded, the padding
    table (timings, traced files and the entry dir are not the config's: they live elsewhere)."""
    old, scene.config = scene.config, quiet_config(compile_sizes=["cudagraph_capture_sizes"])
    scene.config.init_with_cudagraph_sizes([1, 2, 4])
    try:
        yield
    finally:
        scene.config = old


@contextlib.contextmanager
def patched(target, name: str, value, *, env: dict[str, str] | None = None) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(target, name, value)
        for var, text in (env or {}).items():
            mp.setenv(var, text)
        yield


def attr(target, name: str, value) -> Change:
    return lambda scene: patched(target, name, value)


@contextlib.contextmanager
def edited_model(scene: Scene) -> Iterator[None]:
    path = scene.source_root / MODEL_PACKAGE / "model.py"
    text = path.read_text()
    path.write_text(text + "# an edit that changes no graph, only the traced source\n")
    try:
        yield
    finally:
        path.write_text(text)


@contextlib.contextmanager
def moved_model(scene: Scene) -> Iterator[None]:
    """The same package, same contents, under another sys.path entry (another checkout)."""
    other = scene.tmp / "another-checkout"
    shutil.copytree(scene.source_root / MODEL_PACKAGE, other / MODEL_PACKAGE)
    old = scene.files
    scene.files = [str(other / MODEL_PACKAGE / "model.py")]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(other))
        try:
            yield
        finally:
            scene.files = old


@contextlib.contextmanager
def extra_files(scene: Scene, files: list[str]) -> Iterator[None]:
    old = scene.files
    scene.files = [*old, *files]
    try:
        yield
    finally:
        scene.files = old


@contextlib.contextmanager
def workers_copy(scene: Scene) -> Iterator[None]:
    """kiln_source computed from a private copy of kiln's workers/ tree."""
    factors = kiln_factors
    tree = scene.tmp / "workers"
    if not tree.exists():
        copy_workers_tree(tree)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(factors, "_WORKERS_DIR", tree)
        factors.kiln_source_hash.cache_clear()
        try:
            yield
        finally:
            factors.kiln_source_hash.cache_clear()


@contextlib.contextmanager
def edited_kiln(scene: Scene, relative: str, new_file: bool = False) -> Iterator[None]:
    factors = kiln_factors
    path = scene.tmp / "workers" / relative
    text = "" if new_file else path.read_text()
    path.write_text(text + "\n# edited\n")
    factors.kiln_source_hash.cache_clear()
    try:
        yield
    finally:
        path.unlink() if new_file else path.write_text(text)
        factors.kiln_source_hash.cache_clear()


@contextlib.contextmanager
def inductor_source(scene: Scene) -> Iterator[None]:
    from kiln.workers import torch_internals

    factors = kiln_factors
    with patched(torch_internals, "inductor_source_key", lambda: "f" * 32):
        factors._inductor_source_key.cache_clear()
        try:
            yield
        finally:
            factors._inductor_source_key.cache_clear()


@contextlib.contextmanager
def threads(scene: Scene) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(old + 1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def fake_cuda(scene: Scene, name: str = "NVIDIA H200", capability: tuple[int, int] = (9, 0),
              cuda: str = "12.8") -> Iterator[None]:
    """A CUDA device as device_factors sees it (this machine may have none)."""
    props = types.SimpleNamespace(name=name, major=capability[0], minor=capability[1])
    old, scene.device = scene.device, torch.device("cuda", 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_properties", lambda index: props)
        mp.setattr(torch.version, "cuda", cuda)
        try:
            yield
        finally:
            scene.device = old


@contextlib.contextmanager
def device(scene: Scene, kind: str) -> Iterator[None]:
    old, scene.device = scene.device, torch.device(kind)
    try:
        yield
    finally:
        scene.device = old


@contextlib.contextmanager
def inductor_patch(scene: Scene, module: str = "config", **options) -> Iterator[None]:
    import importlib

    with importlib.import_module(f"torch._inductor.{module}").patch(options):
        yield


@contextlib.contextmanager
def rank_one(scene: Scene) -> Iterator[None]:
    from kiln.workers.layers import parallel_state

    with patched(parallel_state, "_STATE", parallel_state.TPState(2, 1)):
        yield


@contextlib.contextmanager
def other_host(scene: Scene) -> Iterator[None]:
    with patched(socket, "gethostname", lambda: "another-host", env={"HOSTNAME": "another-host"}), \
            patched(platform, "node", lambda: "another-host"):
        yield


@contextlib.contextmanager
def env(scene: Scene, **values: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in values.items():
            mp.setenv(name, value)
        yield


OtherPython = collections.namedtuple("OtherPython", "major minor micro releaselevel serial")


@contextlib.contextmanager
def triton_installed(scene: Scene) -> Iterator[None]:
    """A Triton where there is none (the CPU), or another version of it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="9.9.9"))
        yield


# ---- the table ------------------------------------------------------------------------------

# Config fields that change compiled code: each moves the config hash.
CONFIG_ROWS = [
    # (splitting_ops given, or level 2 would derive other ones: the level alone changes)
    Row("level 3 -> 2", True, CONFIG_HASH, partial(config, level=2, splitting_ops=["kiln::attention"]),
        base=partial(config, splitting_ops=["kiln::attention"]), config_field="level"),
    Row("backend inductor -> eager", True, CONFIG_HASH, partial(config, backend="eager"), config_field="backend"),
    Row("custom_ops [] -> all", True, CONFIG_HASH, partial(config, custom_ops=["all"]), config_field="custom_ops"),
    Row("splitting_ops default -> []", True, CONFIG_HASH, partial(config, splitting_ops=[]),
        config_field="splitting_ops"),
    Row("use_inductor off", True, CONFIG_HASH, partial(config, use_inductor=False), config_field="use_inductor"),
    Row("inductor_compile_config max_autotune", True, CONFIG_HASH,
        partial(config, inductor_compile_config={"max_autotune": True}), config_field="inductor_compile_config"),
    Row("inductor_passes + identity", True, CONFIG_HASH, partial(config, inductor_passes={"p": identity_pass}),
        config_field="inductor_passes"),
    Row("pass_config.enable_noop off", True, CONFIG_HASH, partial(config, pass_config={"enable_noop": False}),
        config_field="pass_config.enable_noop"),
]

# PassConfig flags that validation refuses to switch on (test_unimplemented_passes_are_refused
# keeps that true): they cannot change code yet, and need a row once they can.
UNIMPLEMENTED_PASSES = ("enable_fusion", "enable_attn_fusion", "enable_sequence_parallelism",
                        "enable_async_tp", "enable_fi_allreduce_fusion")

# Config fields that do not change compiled code: the same config hash.
CONFIG_NOT_ROWS = [
    Row("compile_sizes [4]", False, change=partial(config, compile_sizes=[4]), config_field="compile_sizes"),
    Row("capture sizes [1, 2, 8]", False, change=partial(config, cudagraph_capture_sizes=[1, 2, 8]),
        config_field="cudagraph_capture_sizes"),
    Row("cudagraph_mode NONE", False, change=partial(config, cudagraph_mode="NONE"), config_field="cudagraph_mode"),
    Row("use_cudagraph off", False, change=partial(config, use_cudagraph=False), config_field="use_cudagraph"),
    Row("full_cuda_graph on", False, change=partial(config, full_cuda_graph=True), config_field="full_cuda_graph"),
    Row("cudagraph_num_of_warmups 3", False, change=partial(config, cudagraph_num_of_warmups=3),
        config_field="cudagraph_num_of_warmups"),
    Row("cudagraph_copy_inputs on", False, change=partial(config, cudagraph_copy_inputs=True),
        config_field="cudagraph_copy_inputs"),
    Row("cudagraph_capture lazy", False, change=partial(config, cudagraph_capture="lazy"),
        config_field="cudagraph_capture"),
    Row("cudagraph_capture_order [4, 1]", False, change=partial(config, cudagraph_capture_order=[4, 1]),
        config_field="cudagraph_capture_order"),
    Row("cache_dir set", False, change=partial(config, cache_dir="/some/cache"), config_field="cache_dir"),
    Row("debug_dump_path set", False, change=partial(config, debug_dump_path="/some/dump"),
        config_field="debug_dump_path"),
]

COMPILER = ("compiler",)
DEVICE = ("compiler", "device")

ROWS: list[Row] = [
    *CONFIG_ROWS,
    # the traced source
    Row("traced model file edited", True, leaf("code_hash"), edited_model),
    # kiln's own codegen source
    Row("kiln codegen file edited", True, leaf(*COMPILER, "kiln_source"),
        partial(edited_kiln, relative="compilation/split.py"), base=workers_copy),
    Row("kiln codegen file added", True, leaf(*COMPILER, "kiln_source"),
        partial(edited_kiln, relative="layers/new_layer.py", new_file=True), base=workers_copy),
    # the toolchain
    Row("torch version", True, leaf(*COMPILER, "torch"), attr(torch, "__version__", "2.99.0+other")),
    Row("torch git revision", True, leaf(*COMPILER, "torch_git"), attr(torch.version, "git_version", "0" * 40)),
    Row("Inductor source", True, leaf(*COMPILER, "inductor_source"), inductor_source),
    Row("Triton version", True, leaf(*COMPILER, "triton"), triton_installed),
    Row("Python version", True, leaf(*COMPILER, "python"), attr(sys, "version_info", OtherPython(3, 99, 0, "final", 0))),
    Row("kiln version", True, leaf(*COMPILER, "kiln"), attr(kiln, "__version__", "99.0.0")),
    Row("cache schema", True, leaf(*COMPILER, "cache_schema"),
        attr(kiln_factors, "CACHE_SCHEMA_VERSION", 99)),
    # the device
    Row("device type", True, leaf(*DEVICE, "type"), partial(device, kind="xpu")),
    Row("CPU architecture", True, leaf(*DEVICE, "name"), attr(platform, "machine", lambda: "aarch64")),
    Row("thread count (set in code)", True, leaf(*DEVICE, "threads"), threads),
    Row("thread count (OMP_NUM_THREADS)", True, leaf(*DEVICE, "threads"), env={"OMP_NUM_THREADS": "1"}),
    Row("CPU capability (ATEN_CPU_CAPABILITY)", True, leaf(*DEVICE, "cpu_capability"),
        env={"ATEN_CPU_CAPABILITY": "default"}),
    Row("GPU model", True, leaf(*DEVICE, "name"), partial(fake_cuda, name="NVIDIA H100"), base=fake_cuda),
    Row("GPU compute capability", True, leaf(*DEVICE, "capability"), partial(fake_cuda, capability=(8, 0)),
        base=fake_cuda),
    Row("CUDA version", True, leaf(*DEVICE, "cuda"), partial(fake_cuda, cuda="13.0"), base=fake_cuda),
    # Inductor's settings, in code and through the environment
    Row("Inductor option in code", True, leaf("inductor", "config", "max_autotune"),
        partial(inductor_patch, max_autotune=True)),
    Row("Inductor nested option in code", True, leaf("inductor", "config", "cpp.simdlen"),
        partial(inductor_patch, **{"cpp.simdlen": 256})),
    Row("Inductor comms option in code", True,
        leaf("inductor", "config_comms", "reorder_iterative_debug_limit_to_reorder"),
        partial(inductor_patch, module="config_comms", reorder_iterative_debug_limit_to_reorder=3)),
    Row("TORCHINDUCTOR_MAX_AUTOTUNE=1", True, leaf("inductor", "config", "max_autotune"),
        env={"TORCHINDUCTOR_MAX_AUTOTUNE": "1"}),
    Row("TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG=1 (not on the old allow-list)", True,
        leaf("inductor", "config", "cpp.enable_unsafe_math_opt_flag"),
        env={"TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG": "1"}),
    Row("TORCH_COMPILE_DEBUG=1", True, leaf("inductor", "config", "trace.provenance_tracking_level"),
        env={"TORCH_COMPILE_DEBUG": "1"}),
    # ---- must not enter
    *CONFIG_NOT_ROWS,
    Row("sizes derived on the config (capture sizes, expanded compile sizes, padding table)", False, change=runtime_state),
    Row("cache root moved", False, change=lambda scene: contextlib.nullcontext(), move_root=True),
    Row("rank 1 of 2", False, change=rank_one),
    Row("rendezvous port and address", False,
        change=partial(env, MASTER_PORT="29533", MASTER_ADDR="10.1.2.3", RANK="1", WORLD_SIZE="2")),
    Row("launcher variables (RANK, LOCAL_RANK, MASTER_PORT)", False,
        env={"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29533"}),
    Row("hostname", False, change=other_host),
    Row("HOME (in this process)", False, change=partial(env, HOME="/home/someone-else")),
    Row("HOME (a process started with it)", False, env={"HOME": "{tmp}/home"}),
    Row("TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR", False,
        env={"TORCHINDUCTOR_CACHE_DIR": "{tmp}/inductor", "TRITON_CACHE_DIR": "{tmp}/triton"}),
    Row("TORCHINDUCTOR_COMPILE_THREADS=1", False, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"}),
    Row("Inductor path options through the environment", False,
        env={"TORCHINDUCTOR_AUTOHEURISTIC_LOG_PATH": "{tmp}/heuristics", "TORCHINDUCTOR_WORKER_LOGPATH": "{tmp}/log",
             "TORCHINDUCTOR_CK_DIR": "{tmp}/ck"}),
    Row("Inductor path options in code", False,
        change=partial(inductor_patch, global_cache_dir="/abs/cache", **{"aot_inductor.output_path": "/abs/out"})),
    Row("Inductor's cache switches in code", False,
        change=partial(inductor_patch, fx_graph_cache=False, autotune_local_cache=False)),
    Row("kiln runtime file edited", False, change=partial(edited_kiln, relative="runtime/kiln_model.py"),
        base=workers_copy),
    Row("traced tree moved to another checkout", False, change=moved_model),
    Row("torch's own files among the traced", False,
        change=partial(extra_files, files=[torch.nn.modules.module.__file__])),
]

ENTER_ROWS = [row for row in ROWS if row.enters]
IN_PROCESS = [row for row in ROWS if row.env is None]
IN_CHILD = [row for row in ROWS if row.env is not None]
