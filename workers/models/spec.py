"""Model specs: `"package.module:factory"`, `"path/to/file.py:factory"` or a checkpoint
directory (`config.json` + `*.safetensors`: kiln's zoo, see loader.py), plus kwargs.

A file path or directory is resolved against the current directory (on a cluster: the job's working
directory, which `ray job submit --working-dir` ships to every node); the file is imported as a
module named after its path so that tracebacks and traced-file names read naturally.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any

_SPEC = re.compile(r"^(?P<target>[^:]+):(?P<attr>[A-Za-z_][A-Za-z0-9_.]*)$")


class ModelSpecError(ValueError):
    """A model spec that cannot be parsed, found or called."""


def checkpoint_dir(spec: str, search_dirs: tuple[str, ...] = ()) -> str | None:
    """The directory `spec` names (resolved like a file spec), or None when it names none."""
    if not isinstance(spec, str) or not spec.strip():
        return None
    candidates = [spec] if os.path.isabs(spec) else [os.path.join(d, spec) for d in (os.getcwd(), *search_dirs)]
    return next((c for c in candidates if os.path.isdir(c)), None)


def parse_model_spec(spec: str) -> tuple[str, str]:
    """(module or file, factory) of a spec; (directory, "") for a checkpoint directory, whose
    config.json is read and checked here (architecture, required keys) so that a bad one fails
    before any worker starts."""
    directory = checkpoint_dir(spec)
    if directory is not None:
        from kiln.workers.models.hf_config import ConfigError, read_hf_config

        try:
            read_hf_config(directory)
        except ConfigError as exc:
            raise ModelSpecError(f"model spec {spec!r}: {exc}") from None
        return directory, ""
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ModelSpecError(
            f"model spec {spec!r}: expected 'package.module:factory', 'path/to/file.py:factory' or a "
            "checkpoint directory (config.json + *.safetensors)")
    return match["target"], match["attr"]


def load_factory(spec: str, search_dirs: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The factory callable named by `spec` (imports its module; for a checkpoint directory, the
    zoo's builder bound to that directory)."""
    directory = checkpoint_dir(spec, search_dirs)
    if directory is not None:
        import functools

        from kiln.workers.models.loader import build

        return functools.partial(build, directory)
    target, attr = parse_model_spec(spec)
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _import_file(target, search_dirs)
    else:
        try:
            module = importlib.import_module(target)
        except (ImportError, TypeError, ValueError) as exc:
            # TypeError/ValueError: names importlib rejects outright (relative ".x", empty).
            raise ModelSpecError(f"model spec {spec!r}: cannot import module {target!r}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"model spec {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    return obj


def _import_file(path: str, search_dirs: tuple[str, ...]):
    candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in (os.getcwd(), *search_dirs)]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise ModelSpecError(f"model spec: file {path!r} not found (looked in {', '.join(candidates)})")
    rel = os.path.relpath(os.path.abspath(found), os.getcwd())
    name = re.sub(r"\W", "_", rel[:-3] if rel.endswith(".py") else rel)
    name = ("kiln_model_" + name) if not rel.startswith("..") else f"kiln_model_{abs(hash(found))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, found)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def build_model(spec: str, kwargs: dict[str, Any] | None = None, search_dirs: tuple[str, ...] = ()) -> Any:
    factory = load_factory(spec, search_dirs)
    try:
        return factory(**(kwargs or {}))
    except TypeError as exc:
        raise ModelSpecError(f"model spec {spec!r}: calling the factory with {kwargs or {}} failed: {exc}") from None
