"""What the invalidation matrix computes keys of, and how it compares two sets of key factors.

A `Scene` is one traced graph's situation: its config, the source files Dynamo traced, the
device. `key_factors(scene)` computes its key factors through `cache_key_factors`, the function
the backend opens its cache entry with. `check_row` is the matrix's verdict on one row: given
the factors before and after the row's change, it shows a new key, no hit and the old entry
untouched (a factor that must enter), or the same key and a hit (an input that must not).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.cache import CacheStore
from kiln.workers.compilation.factors import cache_key_factors
from kiln.workers.config import CompilationConfig

# The traced model of every scene: a file in a package on sys.path, so its relative path is
# "kiln_matrix_model/model.py" wherever the package lies.
MODEL_PACKAGE = "kiln_matrix_model"
MODEL_SOURCE = "import torch\n\n\ndef forward(x):\n    return (x * 3).sin()\n"
GRAPH_KEY = "g" * 32  # a graph published under the old key, looked up under the new one
ARTIFACT = b"compiled under the old key"


def quiet_config(**fields: Any) -> CompilationConfig:
    """A config, its warnings (FULL instead of PIECEWISE without splitting ops…) ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CompilationConfig(**fields)


def write_model(root: Path) -> Path:
    """The model package under `root`; the path of its traced file."""
    package = root / MODEL_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    path = package / "model.py"
    path.write_text(MODEL_SOURCE)
    return path


@dataclass
class Scene:
    """One traced graph's situation; a row's change edits it (or the world around it)."""

    tmp: Path
    """A private directory for the row's files."""
    source_root: Path
    """The sys.path entry holding the model package."""
    config: CompilationConfig = field(default_factory=quiet_config)
    files: list[str] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def key_factors(scene: Scene) -> dict[str, Any]:
    return cache_key_factors(scene.config.compute_hash(), scene.files, scene.device)[0]


def leaves(factors: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of nested key factors by its path of keys (an Inductor option is one key,
    dots and all: ("inductor", "config", "cpp.threads"))."""
    out: dict[tuple[str, ...], Any] = {}
    for name, value in factors.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, (*prefix, name)))
        else:
            out[(*prefix, name)] = value
    return out


def factor_name(path: tuple[str, ...]) -> str:
    """The factor a leaf belongs to: the leaf itself, except that all of an Inductor config
    module's options are one factor (a row per module proves it keys every option)."""
    return "/".join(path[:2] if path[0] == "inductor" else path)


def moved_leaves(before: dict[str, Any], after: dict[str, Any]) -> set[tuple[str, ...]]:
    a, b = leaves(before), leaves(after)
    return {path for path in a.keys() | b.keys() if a.get(path, KeyError) != b.get(path, KeyError)}


def without(factors: dict[str, Any], paths: set[tuple[str, ...]]) -> dict[str, Any]:
    """`factors` with the leaves at `paths` removed: the key as if they were not factors."""
    out: dict[str, Any] = {}
    for name, value in factors.items():
        here = {p[1:] for p in paths if p[0] == name}
        if () in here:
            continue
        out[name] = without(value, here) if isinstance(value, dict) and here else value
    return out


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` → sha256 of its bytes (what "untouched" means)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def check_row(name: str, enters: bool, moves: set[tuple[str, ...]], before: dict, after: dict,
              root: Path, *, move_root: bool = False) -> None:
    """The matrix's verdict on one row (AssertionError if the promise breaks).

    A graph is published in the entry of `before`; then the entry of `after` is opened (in a
    copy of the root with `move_root`). Must enter: a new key, no hit there, a compile there
    leaves the old entry byte for byte as it was, and the factors moved are exactly `moves`
    (the change was alone). Must not enter: nothing moved, the same key, and a hit.
    """
    old = CacheStore(root).entry(before)
    digest, _, _ = old.get_or_compute(GRAPH_KEY, lambda: ARTIFACT)
    untouched = snapshot(old.path)
    if move_root:
        moved_root = root.with_name(root.name + "-moved")
        shutil.copytree(root, moved_root, symlinks=True)
        root = moved_root
    new = CacheStore(root).entry(after)
    if enters:
        assert new.key != old.key, f"{name}: same key {new.key} before and after the change"
        assert new.lookup(GRAPH_KEY) is None, f"{name}: a hit under the new key"
        new.get_or_compute(GRAPH_KEY, lambda: b"compiled under the new key")
        assert snapshot(old.path) == untouched, f"{name}: the old entry changed"
        assert moved_leaves(before, after) == moves, f"{name}: not alone: moved {moved_leaves(before, after)}"
    else:
        assert moved_leaves(before, after) == set(), f"{name}: moved {moved_leaves(before, after)}"
        assert new.key == old.key, f"{name}: a new key"
        assert new.lookup(GRAPH_KEY) == (digest, ARTIFACT), f"{name}: no hit"


def copy_workers_tree(dest: Path) -> Path:
    """A copy of kiln's workers/ sources (what kiln_source hashes), for rows that edit them."""
    from kiln.workers.compilation import factors

    src = Path(factors.__file__).resolve().parents[1]
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    assert os.path.isfile(dest / "compilation" / "factors.py")
    return dest
