"""The invalidation matrix end to end: real compiles through kiln's backend, for a few rows.

The backend opens exactly the entry the matrix computes (`cache_key_factors` of its config hash,
the traced file and the device). A change that must enter the key gives a new entry and a real
compile there (no hit), and leaves the old entry byte for byte as it was; changes that must not
enter load what the first compile stored (a hit, nothing compiled). One tiny graph, sin(3x),
and three Inductor compiles in all: the cold one and one per must-enter row.
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch

from kiln.cache import CacheStore
from kiln.cache.digest import key_from_factors
from kiln.workers.compilation.backend import compile_forward
from kiln.workers.compilation.factors import cache_key_factors
from kiln.workers.compilation.record import CompileRecord
from kiln.workers.layers import parallel_state
from tests.cache_key.scene import quiet_config, snapshot

MODULE = "kiln_matrix_e2e"
SOURCE = ("import torch\n\n\nclass Tiny(torch.nn.Module):\n"
          "    def forward(self, x):  # x: [N, 4]\n        return (x * 3).sin()\n")


def compile_tiny(root, *, rank: int = 0, **config) -> CompileRecord:
    """Trace and compile (or load) the tiny model afresh, run it once; its compile record."""
    torch._dynamo.reset()
    module = importlib.reload(importlib.import_module(f"{MODULE}.model"))  # picks up source edits
    record = CompileRecord()
    # No splitting ops: one piece, compiled for the symbolic batch size only.
    fn, _ = compile_forward(module.Tiny(), quiet_config(splitting_ops=[], **config), store=CacheStore(root),
                            rank=rank, record=record)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fn(x), (x * 3).sin())
    return record


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """(cache root, traced model file, cold compile record)."""
    tmp = tmp_path_factory.mktemp("e2e")
    package = tmp / "src" / MODULE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(SOURCE)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp / "src"))
        root = tmp / "root"
        yield root, package / "model.py", compile_tiny(root)


def test_backend_opens_the_entry_the_matrix_computes(cold):
    root, model, record = cold
    # Positive control for every "nothing compiled" below: the cold run did compile.
    assert (record.inductor_compiles, record.cache_misses, record.cache_hits) == (1, 1, 0)
    factors, relative = cache_key_factors(quiet_config(splitting_ops=[]).compute_hash(), [str(model)],
                                          torch.device("cpu"))
    assert relative == [f"{MODULE}/model.py"] == record.traced_files
    assert record.cache_key == key_from_factors(factors)
    assert json.loads((root / record.cache_key / "key_factors.json").read_text()) == factors


def moved_root(root):
    copy = root.with_name("moved-root")
    if not copy.exists():
        shutil.copytree(root, copy, symlinks=True)
    return copy


def other_process_environment(root, mp):
    mp.setenv("HOME", str(root.parent / "home"))
    mp.setenv("HOSTNAME", "elsewhere")
    mp.setenv("MASTER_PORT", "29533")
    return compile_tiny(root)


def other_tensor_parallel_rank(root, mp):
    mp.setattr(parallel_state, "_STATE", parallel_state.TPState(2, 1))
    return compile_tiny(root)


# Inputs that must not enter the key: name -> the changed compile.
SAME_KEY = {
    "rank 1 (its own index in the entry)": lambda root, mp: compile_tiny(root, rank=1),
    "capture sizes": lambda root, mp: compile_tiny(root, cudagraph_capture_sizes=[1, 2, 8]),
    "cache root moved": lambda root, mp: compile_tiny(moved_root(root)),
    "HOME, hostname, port": other_process_environment,
    "tensor-parallel state rank 1 of 2": other_tensor_parallel_rank,
}


@pytest.mark.parametrize("name", SAME_KEY)
def test_inputs_outside_the_key_load_what_is_there(cold, name, monkeypatch):
    root, _, first = cold
    record = SAME_KEY[name](root, monkeypatch)
    assert record.cache_key == first.cache_key
    assert (record.inductor_compiles, record.cache_hits, record.artifacts_loaded) == (0, 1, 1)


def test_edited_traced_source_compiles_anew_and_leaves_the_old_entry(cold):
    root, model, first = cold
    untouched = snapshot(root / first.cache_key)
    text = model.read_text()
    model.write_text(text + "# edited: the same graph, another source\n")
    try:
        record = compile_tiny(root)
    finally:
        model.write_text(text)
    assert record.cache_key != first.cache_key
    assert (record.inductor_compiles, record.cache_hits) == (1, 0)
    assert snapshot(root / first.cache_key) == untouched


def test_inductor_option_set_in_code_compiles_anew_and_leaves_the_old_entry(cold):
    from kiln.workers import torch_internals

    root, _, first = cold
    untouched = snapshot(root / first.cache_key)
    # Set in code, outside kiln's config: only Inductor's own resolved configuration sees it.
    with torch_internals.inductor_config().patch(size_asserts=not torch_internals.inductor_config().size_asserts):
        record = compile_tiny(root)
    assert record.cache_key != first.cache_key
    assert (record.inductor_compiles, record.cache_hits) == (1, 0)
    assert snapshot(root / first.cache_key) == untouched
