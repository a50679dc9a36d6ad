"""The invalidation matrix: every factor of a cache key invalidates, and nothing else does.

Each row of rows.py changes one thing alone. A factor that must enter: its change moves exactly
its own leaf of the key factors, so a new key, no hit for a graph published under the old key,
and the old entry byte for byte untouched. An input that must not enter (cache root, rank,
port, hostname, HOME, capture sizes, timings, …): nothing moves, the same key and a hit. Keys
come from `cache_key_factors`, the function the backend opens its entry with
(test_end_to_end.py ties the two together with real compiles).

A factor added later without a row fails test_every_key_factor_has_a_row, a CompilationConfig
field without one test_every_config_field_has_a_row; test_each_row_fails_without_its_factor
removes each row's factor from the key and shows that the row then fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kiln.workers.config import CompilationConfig
from kiln.workers.config.pass_config import PassConfig
from tests.cache_key import rows as R
from tests.cache_key.scene import Scene, check_row, factor_name, key_factors, leaves, without, write_model

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("key_child.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tmp, source root, traced model file), the model package importable for the module."""
    tmp = tmp_path_factory.mktemp("matrix")
    source_root = tmp / "src"
    model = write_model(source_root)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(source_root))
        yield tmp, source_root, model


@pytest.fixture
def scene(world, tmp_path) -> Scene:
    _, source_root, model = world
    return Scene(tmp=tmp_path, source_root=source_root, files=[str(model)])


def evaluate(row: R.Row, scene: Scene) -> tuple[dict, dict]:
    """Key factors before and after the row's change, in this process."""
    with row.base(scene) if row.base else contextlib.nullcontext():
        before = key_factors(scene)
        with row.change(scene):
            after = key_factors(scene)
    return before, after


def child_env(tmp: Path, source_root: Path, changes: dict[str, str]) -> dict[str, str]:
    """The children's environment: this one without any variable a row sets, one thread count
    for all (OMP_NUM_THREADS=2, so that the row setting 1 changes it), then the row's change."""
    set_by_rows = {name for row in R.IN_CHILD for name in row.env}
    env = {k: v for k, v in os.environ.items() if k not in set_by_rows}
    env["OMP_NUM_THREADS"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(source_root)])
    env.update({k: v.format(tmp=tmp) for k, v in changes.items()})
    return env


@pytest.fixture(scope="module")
def child_factors(world) -> dict[str, dict]:
    """Row name (and "baseline") → key factors computed in a fresh child process; all at once."""
    tmp, source_root, model = world
    spec = json.dumps({"files": [str(model)]})
    changes = {"baseline": {}} | {row.name: row.env for row in R.IN_CHILD}
    procs = {name: subprocess.Popen([sys.executable, str(CHILD), spec], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=child_env(tmp, source_root, env),
                                    cwd=tmp)  # TORCH_COMPILE_DEBUG writes into the working directory
             for name, env in changes.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: child exited {proc.returncode}:\n{stderr[-3000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])["factors"]
    return out


def row_factors(row: R.Row, scene: Scene, child_factors: dict[str, dict]) -> tuple[dict, dict]:
    if row.env is None:
        return evaluate(row, scene)
    if "ATEN_CPU_CAPABILITY" in row.env and child_factors["baseline"]["compiler"]["device"]["cpu_capability"] == "DEFAULT":
        pytest.skip("this CPU has no vector ISA above DEFAULT: ATEN_CPU_CAPABILITY=default changes nothing")
    return child_factors["baseline"], child_factors[row.name]


def ids(rows: list[R.Row]) -> list[str]:
    return [row.name for row in rows]


@pytest.mark.parametrize("row", R.ROWS, ids=ids(R.ROWS))
def test_row(row, scene, tmp_path, request):
    before, after = row_factors(row, scene, request.getfixturevalue("child_factors") if row.env else {})
    check_row(row.name, row.enters, set(row.moves), before, after, tmp_path / "root", move_root=row.move_root)


@contextlib.contextmanager
def config_field_dropped(field: str):
    """CompilationConfig.compile_factors without `field` ("pass_config.<flag>" for a flag)."""
    real = CompilationConfig.compile_factors

    def compile_factors(self):
        factors = real(self)
        top, _, flag = field.partition(".")
        if flag:
            factors[top] = {k: v for k, v in factors[top].items() if k != flag}
        else:
            del factors[top]
        return factors

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CompilationConfig, "compile_factors", compile_factors)
        yield


@pytest.mark.parametrize("row", R.ENTER_ROWS, ids=ids(R.ENTER_ROWS))
def test_each_row_fails_without_its_factor(row, scene, tmp_path, request):
    """The matrix has teeth: with the row's factor out of the key, the row fails ("same key")."""
    if row.config_field:  # out of the config hash
        with config_field_dropped(row.config_field):
            before, after = evaluate(row, scene)
    else:  # out of the key factors
        before, after = row_factors(row, scene, request.getfixturevalue("child_factors") if row.env else {})
        before, after = without(before, set(row.moves)), without(after, set(row.moves))
    with pytest.raises(AssertionError, match="same key"):
        check_row(row.name, True, set(row.moves), before, after, tmp_path / "root")


def test_every_key_factor_has_a_row(scene):
    """Every leaf of the key, on a CPU and on a CUDA device, is moved by some row."""
    paths = set(leaves(key_factors(scene)))
    with R.fake_cuda(scene):
        paths |= set(leaves(key_factors(scene)))
    assert "inductor/config" in {factor_name(p) for p in paths}
    covered = {factor_name(p) for row in R.ENTER_ROWS for p in row.moves}
    assert {factor_name(p) for p in paths} == covered
    # Inductor's settings are proven both ways they can be given.
    inductor = [row for row in R.ENTER_ROWS if any(p[:2] == ("inductor", "config") for p in row.moves)]
    assert {row.env is None for row in inductor} == {True, False}


def test_every_config_field_has_a_row():
    """Each field either changes code (in compile_factors, with a row showing it moves the
    config hash) or does not (with a row showing it moves nothing)."""
    code = set(CompilationConfig().compile_factors())
    fields = set(CompilationConfig.model_fields)
    assert code <= fields
    expected = (code - {"pass_config"}) | {f"pass_config.{flag}" for flag in PassConfig.model_fields
                                           if flag not in R.UNIMPLEMENTED_PASSES}
    assert {row.config_field for row in R.CONFIG_ROWS} == expected
    assert {row.config_field for row in R.CONFIG_NOT_ROWS} == fields - code


def flat_compile_factors(config: CompilationConfig) -> dict:
    factors = config.compile_factors()
    flags = factors.pop("pass_config")
    return {**factors, **{f"pass_config.{flag}": value for flag, value in flags.items()}}


@pytest.mark.parametrize("row", R.CONFIG_ROWS, ids=ids(R.CONFIG_ROWS))
def test_config_rows_change_their_field_alone(row, scene):
    with row.base(scene) if row.base else contextlib.nullcontext():
        before = flat_compile_factors(scene.config)
        with row.change(scene):
            after = flat_compile_factors(scene.config)
    assert {name for name in before if before[name] != after[name]} == {row.config_field}


@pytest.mark.parametrize("flag", R.UNIMPLEMENTED_PASSES)
def test_unimplemented_passes_are_refused(flag):
    with pytest.raises(ValidationError, match="not implemented yet"):
        CompilationConfig(pass_config={flag: True})


def test_children_keys_hold_no_paths(world, child_factors):
    """Path-valued settings (cache dirs, log paths, HOME) never reach a key."""
    tmp, source_root, _ = world
    for name, factors in child_factors.items():
        text = json.dumps(factors)
        assert str(tmp) not in text and str(source_root) not in text, name
        assert os.path.expanduser("~") not in text, name


def test_matrix_scene_is_the_backends_default_situation(scene):
    """The scene's factors are those of a default config on this CPU with this file traced."""
    factors = key_factors(scene)
    assert factors["config_hash"] == CompilationConfig().compute_hash()
    assert factors["compiler"]["device"]["threads"] == torch.get_num_threads()
    assert set(factors) == {"config_hash", "code_hash", "compiler", "inductor"}
