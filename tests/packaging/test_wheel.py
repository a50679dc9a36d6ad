"""kiln installs as one import package, `kiln`, and works from an installed copy outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"kiln": "kiln", "kiln.orchestrator": "orchestrator", "kiln.workers": "workers", "kiln.cache": "cache"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The repo's build backend, as installed for the tests (no download of a build environment).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO_ROOT)], check=True, timeout=300)
    (found,) = out.glob("torch_kiln-*.whl")
    return found


def test_wheel_has_no_top_level_module_but_kiln(wheel):
    with zipfile.ZipFile(wheel) as whl:
        tops = {name.split("/")[0] for name in whl.namelist()}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"kiln"}, sorted(tops)


def test_every_source_package_is_in_the_wheel(wheel):
    # A sub-package missing from pyproject's `packages` list would be silently left out.
    expected = set()
    for package, folder in PACKAGE_DIRS.items():
        for init in (REPO_ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO_ROOT / folder)
            expected.add(".".join([package, *rel.parts]))
    with zipfile.ZipFile(wheel) as whl:
        packaged = {os.path.dirname(n).replace("/", ".") for n in whl.namelist() if n.endswith("/__init__.py")}
    assert expected == packaged, sorted(expected ^ packaged)
    declared = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert declared == expected


def test_installed_copy_imports_and_reports_its_version(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import kiln, sys; from kiln import Orchestrator, CompilationConfig, CUDAGraphMode, KilnModel;"
            "print(kiln.__file__);"
            "bad = [m for m in ('workers', 'cache', 'orchestrator') if m in sys.modules]; assert not bad, bad")
    # Outside the repo, so nothing of the checkout can be imported by accident.
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target)), out.stdout
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"].get("version")
    for command in ([sys.executable, "-m", "kiln", "--version"], [str(target / "bin" / "kiln"), "--version"]):
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("kiln, version "), run.stdout
        assert version is None or version in run.stdout
    assert not any((target / name).exists() for name in ("workers", "cache", "orchestrator"))


def test_source_checkout_runs_without_install(tmp_path):
    # `python -m kiln` from a checkout on PYTHONPATH (no install): the sub-packages resolve
    # beside kiln/.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", "import kiln.workers.config as c, kiln; print(c.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(str(REPO_ROOT / "workers")), run.stdout
    version = subprocess.run([sys.executable, "-m", "kiln", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("kiln, version"), version.stderr


def test_entry_points_point_into_kiln():
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"]["kiln"].startswith("kiln.")
    assert meta["entry-points"]["torch_dynamo_backends"]["kiln"].startswith("kiln.")
