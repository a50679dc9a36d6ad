"""Compile one graph with Inductor into a self-contained, relocatable artifact, and load it back.

A saved Inductor artifact alone does not carry the compiled kernels it calls: loaded in a
process with an empty Inductor cache it runs the C++ (or Triton) compiler again. So every
compile runs with Inductor's and Triton's cache directories pointed at a fresh private
directory, and the artifact kiln stores is that directory's useful contents (Inductor's
"unpacked" artifact plus the kernel binaries it compiled) packed into one deterministic tar.
Loading extracts the verified bytes into a private directory and loads from there, with
header precompilation off, so no compiler runs.
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
) -> tuple[CompiledFn, bytes]:
    """Compile `gm` with Inductor; return the callable and its packed, relocatable artifact."""
    with tempfile.TemporaryDirectory(prefix="kiln-compile-") as work:
        build_dir = os.path.join(work, "build")
        save_dir = os.path.join(work, "artifact")
        os.makedirs(build_dir)
        with _compiler_cache_dirs(build_dir):
            artifact = torch_internals.standalone_compile(
                gm, example_inputs, dynamic_shapes=dynamic_shapes, config_patches=config_patches)
            artifact.save(path=save_dir, format="unpacked")
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


def load_graph(data: bytes, extract_root: str) -> CompiledFn:
    """Load a packed artifact (already digest-verified) without invoking any compiler.

    The files are extracted under `extract_root`, which must outlive the returned callable's
    use of lazily loaded kernels (kiln keeps one private directory per process).
    """
    target = tempfile.mkdtemp(prefix="artifact-", dir=extract_root)
    manifest = _unpack(data, target)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"artifact format {manifest.get('format')!r}, expected {ARTIFACT_FORMAT}")
    try:
        with _compiler_cache_dirs(target), torch_internals.skip_header_precompile():
            return torch_internals.load_artifact(target)
    except Exception as exc:  # torch raises assorted types for a bad artifact
        raise ArtifactError(f"failed to load artifact: {type(exc).__name__}: {exc}") from exc


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
