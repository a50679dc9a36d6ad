"""Fixtures shared by the cache tests: a fresh store, and child processes running cache_worker.py."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).with_name("cache_worker.py")

# `import cache` must work under plain `pytest` too, not only `python -m pytest` from the root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Where a test's cache root goes (not created yet)."""
    return tmp_path / "cache-root"


@pytest.fixture
def store(root: Path):
    from kiln.cache import CacheStore

    return CacheStore(root)


@pytest.fixture
def entry(store):
    return store.entry({"config": "abc", "torch": "2.13", "env": {"TORCHINDUCTOR_X": "1"}})


@pytest.fixture
def worker_factors() -> dict:
    """The key factors cache_worker.py opens its entry with."""
    return {"test": "concurrency", "schema": 1}


class Workers:
    """Starts cache_worker.py children and makes sure none outlives the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: object) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 30) -> str:
        """Wait for a worker; fail with its stderr if it failed; return its stdout."""
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"worker exited {proc.returncode}:\n{err}"
        return out

    @staticmethod
    def wait_for_line(proc: subprocess.Popen, expected: str, timeout: float = 20) -> None:
        """Block until the worker prints the line `expected` (workers flush every line)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                assert left > 0 and sel.select(left), f"worker did not print {expected!r} within {timeout} s"
                line = proc.stdout.readline()
                assert line, f"worker exited before printing {expected!r}:\n{proc.stderr.read()}"
                if line.strip() == expected:
                    return

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def workers():
    w = Workers()
    yield w
    w.kill_all()
