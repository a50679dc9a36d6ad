"""Fixtures of the reliability suite: figures, one shared cold cache, a local Ray cluster.

Every test here records one figure: a JSON line {"scenario", "lost", "recovery_s"} appended to
the file named by $KILN_RELIABILITY_LOG (nothing is written when it is unset).
benchmarks/reliability_figures.py runs the suite with it and tabulates the lines.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.reliability.mounts import Mounts
from tests.reliability.support import run_child

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LOG_ENV_VAR = "KILN_RELIABILITY_LOG"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item, so the figure fixture can tell a pass from a failure.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


class Figure:
    """One scenario's figure. A test sets `scenario`, calls fault() when it injects the fault and
    recovered() once a verified good state is reached; `lost` stays "nothing" unless the test
    fails (then it says so) or the test names what was lost."""

    def __init__(self, scenario: str):
        self.scenario = scenario
        self.lost = "nothing"
        self.fault_at: float | None = None
        self.recovery_s: float | None = None

    def fault(self, at: float | None = None) -> None:
        """Mark the moment of the fault (wall clock; `at` for a time observed elsewhere)."""
        self.fault_at = time.time() if at is None else at

    def recovered(self) -> float:
        """Mark the verified good state; returns the seconds since the fault."""
        assert self.fault_at is not None, "fault() was never called"
        self.recovery_s = round(time.time() - self.fault_at, 3)
        return self.recovery_s

    def observe(self, seconds: float) -> None:
        """For tests of many quick cases (property tests): keep the slowest time to a clean error."""
        self.recovery_s = round(max(self.recovery_s or 0.0, seconds), 3)

    def line(self) -> dict:
        return {"scenario": self.scenario, "lost": self.lost, "recovery_s": self.recovery_s}


@pytest.fixture
def figure(request):
    """The Figure of this test, written to $KILN_RELIABILITY_LOG after the test has run."""
    fig = Figure(request.node.name)
    yield fig
    call = getattr(request.node, "rep_call", None)
    if call is None or call.skipped:
        return  # a skipped test measured nothing
    if call.failed:
        crash = getattr(call.longrepr, "reprcrash", None)
        message = (getattr(crash, "message", None) or str(call.longrepr)).strip() or "?"
        fig.lost = f"test failed: {message.splitlines()[0][:200]}"
    path = os.environ.get(LOG_ENV_VAR)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**fig.line(), "test": request.node.nodeid}) + "\n")


@pytest.fixture(scope="session")
def cold_cache(tmp_path_factory) -> tuple[Path, dict]:
    """(root, child result) of one cold compile of the tiny model; copy it, never change it."""
    work = tmp_path_factory.mktemp("cold")
    result = run_child({"root": str(work / "root")}, work)
    return work / "root", result


@pytest.fixture
def cache_copy(cold_cache, tmp_path) -> tuple[Path, dict]:
    """A private copy of the cold cache: (root, cold child result)."""
    root, result = cold_cache
    copy = tmp_path / "root"
    shutil.copytree(root, copy, symlinks=True)
    return copy, result


@pytest.fixture(scope="session")
def _ray_session():
    """The address of the local cluster ray_local started, if any; shut down at the very end."""
    started: dict[str, str] = {}
    yield started
    import ray

    if started and ray.is_initialized() and ray.get_runtime_context().gcs_address == started["address"]:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session) -> str:
    """A local Ray cluster (127.0.0.1, 8 CPUs); its GCS address. Started once and shared by the
    modules that use it (each start costs seconds); restarted if another test replaced it."""
    import ray

    from kiln.orchestrator.cluster import connect

    address = _ray_session.get("address")
    if not (ray.is_initialized() and ray.get_runtime_context().gcs_address == address):
        if ray.is_initialized():
            ray.shutdown()
        connect(None, num_cpus=8)
        _ray_session["address"] = ray.get_runtime_context().gcs_address
    return _ray_session["address"]


@pytest.fixture
def mounts():
    """Mounts a test makes (tests/reliability/mounts.py); always unmounted afterwards."""
    m = Mounts()
    yield m
    m.unmount_all()
