"""Concurrency: `kiln warmup` processes (8; 3 in CI) started together on one cache and one Ray cluster.

Each piece is compiled by exactly one of them (the cache's compute-once locks); the others
wait and load. All exit 0 and the cache verifies clean.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.reliability.support import (
    MODEL,
    REPO_ROOT,
    UNIQUE_PIECES,
    child_env,
    half_written,
    tiny_model_args,
    verify_clean,
)

pytestmark = pytest.mark.reliability


def warmup_command(root, address: str, report) -> list[str]:
    return [sys.executable, "-m", "kiln.orchestrator.cli", "warmup", MODEL, "--tp", "1", "--sizes", "2", *tiny_model_args(),
            "--cache-root", str(root), "--address", address, "--report", str(report), "--quiet"]


# Eight processes cost about 100 s on 2 cores: CI runs three, which race the same way.
@pytest.mark.timeout(1200)  # its own wait for the processes (900 s) comes first
@pytest.mark.parametrize("jobs", [3, pytest.param(8, marks=pytest.mark.slow)])
def test_cli_warmups_on_one_cluster_compile_each_piece_once(ray_local, tmp_path, figure, jobs):
    figure.scenario = f"concurrency: {jobs} kiln warmup processes, one cache"
    root = tmp_path / "root"
    reports = [tmp_path / f"report-{i}.json" for i in range(jobs)]
    env = child_env(tmp_path)
    logs = [tmp_path / f"warmup-{i}.log" for i in range(jobs)]  # files, not pipes: nobody blocks on a full pipe
    figure.fault()  # the contention starts now: all of them race for the same pieces
    procs = []
    for report, log in zip(reports, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(warmup_command(root, ray_local, report), cwd=REPO_ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=900)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    failed = [(i, log.read_text()[-2000:]) for i, (proc, log) in enumerate(zip(procs, logs)) if proc.returncode]
    assert not failed, failed

    ranks = [rank for report in reports for rank in json.loads(report.read_text())["ranks"]]
    assert len(ranks) == jobs
    assert sum(r["inductor_compiles"] for r in ranks) == UNIQUE_PIECES
    assert sum(r["cache_hits"] for r in ranks) == jobs * UNIQUE_PIECES - UNIQUE_PIECES
    assert len({r["cache_key"] for r in ranks}) == 1
    verify_clean(root)
    assert half_written(root) == []
    figure.recovered()
