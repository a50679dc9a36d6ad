"""Compile one graph with Inductor into a self-contained, relocatable artifact, and load it back.

A saved Inductor artifact alone does not carry the compiled kernels it calls: loaded in a
process with an empty Inductor cache it runs the C++ (or Triton) compiler again. So every
compile runs with Inductor's and Triton's cache directories pointed at a fresh private
directory, and the artifact kiln stores is that directory's useful contents (Inductor's
"unpacked" artifact plus the kernel binaries it compiled) packed into one deterministic tar.
Loading extracts the verified bytes into a private directory and loads from there, with
header precompilation off, so no compiler runs.

On CUDA, Triton's autotuner picks each kernel's config at the kernel's first launch, not while
compiling, and saves its choice in Inductor's cache directory. So a CUDA artifact is run once
(`tuning_inputs`) before its build directory is packed: the choices travel with the artifact,
and a warm process benchmarks nothing. Loading points the kernels at them
(torch_internals.autotune_results_under).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx

from kiln.workers import torch_internals

ARTIFACT_FORMAT = 1
_MANIFEST = "kiln_artifact.json"
# Files Inductor writes that a load never needs.
_SKIP_DIRS = {"locks"}

CompiledFn = Callable[..., Any]


class ArtifactError(RuntimeError):
    """A stored artifact that cannot be used (malformed, foreign format, failed to load)."""


@contextlib.contextmanager
def _compiler_cache_dirs(path: str) -> Iterator[None]:
    """Point Inductor's and Triton's caches at `path` (and only there) for the block."""
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    torch_internals.clear_inductor_caches()
    try:
        yield
    finally:
        torch_internals.clear_inductor_caches()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    dynamic_shapes: str,
    config_patches: dict[str, Any],
    tuning_inputs: Callable[[], Sequence[Any]] | None = None,
    notes: list[str] | None = None,
) -> tuple[CompiledFn, bytes]:
    """Compile `gm` with Inductor; return the callable and its packed, relocatable artifact.

    `tuning_inputs` (CUDA): makes inputs that are safe to run the compiled graph on (no real
    state it writes to); the graph runs once on them so that the autotuner's choices are packed.
    A failure of that run is not a failed compile: it is noted in `notes` (the choices are then
    made again at the first launch of every process) and the artifact is kept.
    """
    with tempfile.TemporaryDirectory(prefix="kiln-compile-") as work:
        build_dir = os.path.join(work, "build")
        save_dir = os.path.join(work, "artifact")
        os.makedirs(build_dir)
        # Compile-time autotuning (max-autotune) is counted too; Inductor imports it now anyway.
        torch_internals.install_autotune_counter(everything=True)
        with _compiler_cache_dirs(build_dir):
            artifact = torch_internals.standalone_compile(
                gm, example_inputs, dynamic_shapes=dynamic_shapes, config_patches=config_patches)
            artifact.save(path=save_dir, format="unpacked")
            if tuning_inputs is not None:
                _tune(artifact, tuning_inputs, notes)
        # The unpacked artifact holds Inductor's graph entries; the kernels it calls were
        # compiled into build_dir. Carry every build file the artifact lacks.
        for base, dirs, files in os.walk(build_dir):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
            rel = os.path.relpath(base, build_dir)
            for name in files:
                target = os.path.join(save_dir, rel, name)
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(os.path.join(base, name), target)
        return artifact, _pack(save_dir)


def _tune(artifact: CompiledFn, tuning_inputs: Callable[[], Sequence[Any]], notes: list[str] | None) -> None:
    """Run the freshly compiled graph once, inside its build directory's cache settings, so the
    runtime autotuner benchmarks now and writes its `.best_config` files there."""
    try:
        # The backend compiles inside its fake-tensor walk of the split graph: leave it.
        with torch_internals.real_tensors(), torch.no_grad():
            inputs = list(tuning_inputs())
            artifact(*inputs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - an optional step; the compile itself succeeded
        if notes is not None:
            notes.append(f"autotuning run skipped ({type(exc).__name__}: {exc}); its kernels tune "
                         "at their first launch in every process")


def unpack_artifact(data: bytes, extract_root: str) -> str:
    """Extract a packed artifact (already digest-verified) into a new private directory under
    `extract_root`; return that directory. Safe to run in several threads at once."""
    target = tempfile.mkdtemp(prefix="artifact-", dir=extract_root)
    manifest = _unpack(data, target)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"artifact format {manifest.get('format')!r}, expected {ARTIFACT_FORMAT}")
    return target


def load_unpacked(target: str) -> CompiledFn:
    """Load an artifact that `unpack_artifact` extracted, without invoking any compiler (one
    thread at a time: Inductor's cache directory is process state)."""
    try:
        with (_compiler_cache_dirs(target), torch_internals.skip_header_precompile(),
              torch_internals.trusting_cpu_isa(), torch_internals.autotune_results_under(target)):
            return torch_internals.load_artifact(target)
    except Exception as exc:  # torch raises assorted types for a bad artifact
        raise ArtifactError(f"failed to load artifact: {type(exc).__name__}: {exc}") from exc


def load_graph(data: bytes, extract_root: str) -> CompiledFn:
    """Load a packed artifact (already digest-verified) without invoking any compiler.

    The files are extracted under `extract_root`, which must outlive the returned callable's
    use of lazily loaded kernels (kiln keeps one private directory per process).
    """
    return load_unpacked(unpack_artifact(data, extract_root))


def _pack(directory: str) -> bytes:
    """Deterministic tar of `directory` plus a manifest: same files, same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        manifest = json.dumps({"format": ARTIFACT_FORMAT, "torch": torch.__version__}).encode()
        _add_bytes(tar, _MANIFEST, manifest, 0o644)
        for base, dirs, files in os.walk(directory):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    _add_bytes(tar, os.path.relpath(path, directory), f.read(), mode)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _unpack(data: bytes, target: str) -> dict[str, Any]:
    """Extract regular files only, refusing absolute or escaping names."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            manifest: dict[str, Any] | None = None
            for member in tar.getmembers():
                name = os.path.normpath(member.name)
                if not member.isfile() or name.startswith(("..", "/")) or os.path.isabs(name):
                    raise ArtifactError(f"artifact member {member.name!r} is not a plain relative file")
                payload = tar.extractfile(member).read()
                if name == _MANIFEST:
                    manifest = json.loads(payload)
                    continue
                path = os.path.join(target, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(payload)
                os.chmod(path, member.mode & 0o755)
    except (tarfile.TarError, json.JSONDecodeError, OSError) as exc:
        raise ArtifactError(f"malformed artifact: {exc}") from exc
    if manifest is None:
        raise ArtifactError("artifact has no manifest")
    return manifest
