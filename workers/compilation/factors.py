"""The factors of a cache key that kiln computes with torch in hand.

`compiler_factors()` names everything about the toolchain that changes generated code; the code
hash covers the model source Dynamo traced; `codegen_env()` is the allow-list of environment
variables that change code generation. Together with the config hash they make the cache key
(see cache/). Absolute paths, HOME, ranks, ports and hostnames never enter a key.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import xxhash

from kiln.workers import torch_internals

# Bump when the layout or meaning of what kiln stores changes.
CACHE_SCHEMA_VERSION = 1

# Environment variables that change what Inductor generates (allow-list: nothing else enters).
CODEGEN_ENV_VARS = (
    "TORCHINDUCTOR_MAX_AUTOTUNE",
    "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM",
    "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE",
    "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING",
    "TORCHINDUCTOR_FREEZING",
    "TORCHINDUCTOR_CPP_WRAPPER",
    "TORCHINDUCTOR_LAYOUT_OPTIMIZATION",
    "TORCHINDUCTOR_FALLBACK_RANDOM",
    "TORCHINDUCTOR_EMULATE_PRECISION_CASTS",
    "TORCHINDUCTOR_SIZE_ASSERTS",
    "TORCHINDUCTOR_NAN_ASSERTS",
    "TORCH_COMPILE_DEBUG",
    "ATEN_CPU_CAPABILITY",
)

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


def codegen_env() -> dict[str, str]:
    return {name: os.environ[name] for name in CODEGEN_ENV_VARS if name in os.environ}


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
