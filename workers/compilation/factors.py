"""The factors of a cache key that kiln computes with torch in hand.

`cache_key_factors()` is the whole key of one traced graph, as the backend opens its cache
entry with it: the config hash, the code hash of the model source Dynamo traced,
`compiler_factors()` (everything about the toolchain and the device that changes generated
code) and `inductor_settings()` (Inductor's own resolved configuration, however each option was
set). The cache store hashes them (see cache/). Absolute paths, HOME, ranks, ports and
hostnames never enter a key.
"""

from __future__ import annotations

import enum
import functools
import os
import platform
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import xxhash

from kiln.workers import torch_internals

# Bump when the layout or meaning of what kiln stores changes.
CACHE_SCHEMA_VERSION = 1

# Inductor options left out of the key on top of those Inductor's own cache leaves out (see
# torch_internals.inductor_portable_config): options that name a file or a directory, by name
# (…_dir, …_path, …_logpath, …_home: worker_log_path, autoheuristic_log_path, global_cache_dir,
# torchinductor_worker_logpath, triton.proton_output_dir, aot_inductor.output_path,
# aot_inductor.aoti_shim_library_path, rocm.rocm_home, rocm.ck_dir,
# aten_distributed_optimizations.profile_guided_estimations_profile_path on torch 2.13) or by an
# absolute path as value. Where a log, a profile, an output or a toolkit lies on this machine is
# not the code Inductor generates, and an absolute path in a key would make every other machine
# and every other checkout miss. (Inductor's cache and Triton's, TORCHINDUCTOR_CACHE_DIR and
# TRITON_CACHE_DIR, are not config options at all: they never enter.)
_PATH_OPTION = re.compile(r"(_dir|_path|_logpath|_home)$")

_WORKERS_DIR = Path(__file__).resolve().parents[1]

# kiln's sub-packages whose code shapes what Inductor compiles or how an artifact is stored:
# every file in them, so a new file can never be forgotten. The rest (runtime/, models/, the
# worker, its protocol) runs around compiled code and stays out of the key, so editing it keeps
# the cache; the model code Dynamo traces is covered by the code hash instead.
CODEGEN_PACKAGES = ("config", "compilation", "layers")


def kiln_version() -> str:
    from kiln import __version__

    return __version__


def codegen_source_files() -> list[Path]:
    """Every .py file of CODEGEN_PACKAGES (and torch_internals, the seam they compile through)."""
    files = [_WORKERS_DIR / "torch_internals.py"]
    for package in CODEGEN_PACKAGES:
        files += sorted((_WORKERS_DIR / package).rglob("*.py"))
    return files


@functools.cache
def kiln_source_hash() -> str:
    """Hash of kiln's own code that shapes compiled artifacts (codegen_source_files())."""
    h = xxhash.xxh3_128()
    for path in codegen_source_files():
        h.update(path.relative_to(_WORKERS_DIR).as_posix().encode() + b"\0")
        h.update(xxhash.xxh3_128_digest(path.read_bytes()))
    return h.hexdigest()


@functools.cache
def _inductor_source_key() -> str:
    return torch_internals.inductor_source_key()


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def device_factors(device: torch.device) -> dict[str, Any]:
    """What about the device changes generated code."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda or "none",
        }
    return {
        "type": device.type,
        "name": platform.machine(),
        # Inductor's C++ kernels are built for the CPU's vector ISA and bake in the OpenMP
        # thread count. (ATen's capability is read from cpuinfo; Inductor's own ISA probe would
        # run the C++ compiler, which a warm start must not do.)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def compiler_factors(device: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", "unknown"),
        "inductor_source": _inductor_source_key(),
        "triton": _triton_version(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "kiln": kiln_version(),
        "kiln_source": kiln_source_hash(),
        "cache_schema": CACHE_SCHEMA_VERSION,
        "device": device_factors(device),
    }


def _is_path_option(name: str, value: Any) -> bool:
    return bool(_PATH_OPTION.search(name)) or (isinstance(value, str) and os.path.isabs(value))


def _json_value(name: str, value: Any) -> Any:
    """An option's value as plain JSON that is the same in every process."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (list, tuple)):
        return [_json_value(name, v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_json_value(name, v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): _json_value(name, v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    text = repr(value)
    # A repr with an address differs in every process: such a key would never hit again.
    if " at 0x" in text:
        raise ValueError(f"Inductor option {name!r} holds {text}, which cannot key a cache entry; "
                         "leave it at its default or give it a plain value")
    return text


def inductor_settings() -> dict[str, dict[str, Any]]:
    """Inductor's resolved configuration as plain JSON, without options that name paths."""
    return {
        module: {name: _json_value(name, value) for name, value in sorted(options.items())
                 if not _is_path_option(name, value)}
        for module, options in torch_internals.inductor_portable_config().items()
    }


def cache_key_factors(config_hash: str, traced_files: Iterable[str],
                      device: torch.device) -> tuple[dict[str, Any], list[str]]:
    """(factors, relative paths of the traced files): the key factors of one traced graph's
    cache entry, exactly as the backend opens it (CacheStore.entry hashes them; the entry's
    key_factors.json shows them)."""
    digest, relative = code_hash(traced_files)
    factors = {
        "config_hash": config_hash,
        "code_hash": digest,
        "compiler": compiler_factors(device),
        "inductor": inductor_settings(),
    }
    return factors, relative


def relative_source_path(filename: str) -> str:
    """A source file's path relative to the sys.path entry holding it (never absolute)."""
    path = os.path.abspath(filename)
    best = ""
    for entry in sys.path:
        root = os.path.abspath(entry or os.getcwd())
        if path.startswith(root + os.sep) and len(root) > len(best):
            best = root
    return os.path.relpath(path, best) if best else os.path.basename(path)


def is_torch_source(filename: str) -> bool:
    """torch's own files are covered by the torch factors, not by the code hash."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    return os.path.abspath(filename).startswith(torch_dir + os.sep)


def code_hash(filenames: Iterable[str]) -> tuple[str, list[str]]:
    """Hash of the contents of the traced source files, keyed by their relative paths."""
    files: dict[str, bytes] = {}
    for name in filenames:
        if not name or name.startswith("<") or not os.path.isfile(name) or is_torch_source(name):
            continue
        with open(name, "rb") as f:
            files[relative_source_path(name)] = f.read()
    h = xxhash.xxh3_128()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0")
        h.update(xxhash.xxh3_128_digest(files[rel]))
    return h.hexdigest(), sorted(files)
