"""Model specs: `"package.module:factory"` or `"path/to/file.py:factory"`, plus kwargs.

A file path is resolved against the current directory (on a cluster: the job's working
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


def parse_model_spec(spec: str) -> tuple[str, str]:
    match = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ModelSpecError(
            f"model spec {spec!r}: expected 'package.module:factory' or 'path/to/file.py:factory'")
    return match["target"], match["attr"]


def load_factory(spec: str, search_dirs: tuple[str, ...] = ()) -> Callable[..., Any]:
    """The factory callable named by `spec` (imports its module)."""
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
