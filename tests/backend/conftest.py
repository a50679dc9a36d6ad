"""Shared helpers for backend tests: run compile_child.py in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("compile_child.py")


def run_child(spec: dict, tmp_path: Path, *, empty_compiler_caches: bool = True, child: Path = CHILD) -> dict:
    """Compile in a child process (`child`, default compile_child.py); with empty Inductor/Triton
    cache dirs unless told otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    if empty_compiler_caches:
        n = len(list(tmp_path.glob("inductor-*")))
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / f"inductor-{n}")
        env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton-{n}")
        (tmp_path / f"inductor-{n}").mkdir()
    proc = subprocess.run([sys.executable, str(child), json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("backend")
