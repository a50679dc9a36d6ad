"""Kills: SIGKILL a process mid-compile and mid-artifact-write, and a Ray worker mid-compile.

After each kill the next warm-up succeeds, compiles exactly what the killed one had not
published (one of the tiny model's 2 pieces), its outputs equal eager ones, and
`kiln cache verify` finds the cache clean. The process kills start from a warm cache that
lacks one artifact, so the killed run is compiling that one; the Ray kills start cold and die
at the second compile or half-way through the second artifact write. CI runs the Ray kill
mid-compile; the others are slow (-m slow).
"""

from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

from kiln.cache.atomic import is_temp_name
from tests.reliability.support import (
    UNIQUE_PIECES,
    drop_artifact,
    half_written,
    index_entries,
    run_child,
    start_child,
    verify_clean,
    wait_for_file,
)

pytestmark = pytest.mark.reliability

MAX_ERR = 1e-3  # kiln's outputs against eager ones (float32, fused kernels)


def kill_at_marker(spec: dict, tmp_path, marker) -> float:
    """Start a child with a fault, SIGKILL it once it reaches the fault; the time of the kill."""
    proc = start_child(spec, tmp_path)
    try:
        wait_for_file(marker, proc)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.time()
    finally:
        if proc.poll() is None:  # also when the wait failed: never leave the child behind
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return killed_at


def warm_but_one(cache_copy):
    """A copy of the warm cache without one artifact: (root, its key, the remaining artifact)."""
    root, cold = cache_copy
    key = cold["key"]
    dropped, kept = sorted(v["digest"] for v in index_entries(root, key).values())
    drop_artifact(root / key, dropped)
    return root, key, kept


@pytest.mark.slow
def test_sigkill_during_inductor_compile(cache_copy, tmp_path, figure):
    figure.scenario = "kill: process mid Inductor compile"
    root, key, _ = warm_but_one(cache_copy)
    marker = tmp_path / "compiling"
    before = sorted(os.listdir(root / key / "blobs")), sorted(os.listdir(root / key / "refs"))
    figure.fault(kill_at_marker(
        {"root": str(root), "fault": {"at": "compile", "nth": 1, "marker": str(marker)}}, tmp_path, marker))

    assert (sorted(os.listdir(root / key / "blobs")), sorted(os.listdir(root / key / "refs"))) == before
    assert half_written(root) == []

    result = run_child({"root": str(root)}, tmp_path)
    record = result["record"]
    assert (record["inductor_compiles"], record["cache_hits"]) == (1, UNIQUE_PIECES - 1)
    assert result["max_err"] < MAX_ERR
    verify_clean(root)
    figure.recovered()


@pytest.mark.slow
def test_sigkill_during_artifact_write(cache_copy, tmp_path, figure):
    figure.scenario = "kill: process mid artifact write"
    root, key, kept = warm_but_one(cache_copy)
    marker = tmp_path / "writing"
    refs_before = sorted(os.listdir(root / key / "refs"))
    figure.fault(kill_at_marker(
        {"root": str(root), "fault": {"at": "blob_write", "nth": 1, "marker": str(marker)}}, tmp_path, marker))

    # The new artifact died half-written under a temporary name, where no loader ever looks.
    blobs = sorted(os.listdir(root / key / "blobs"))
    assert len(blobs) == 2 and kept in blobs and is_temp_name([b for b in blobs if b != kept][0]), blobs
    assert sorted(os.listdir(root / key / "refs")) == refs_before

    result = run_child({"root": str(root)}, tmp_path)
    record = result["record"]
    assert (record["inductor_compiles"], record["cache_hits"]) == (1, UNIQUE_PIECES - 1)
    assert result["max_err"] < MAX_ERR
    verify_clean(root)  # the young temporary file may belong to a live writer: left alone
    assert [p for p in half_written(root) if not is_temp_name(os.path.basename(p))] == []
    figure.recovered()


# A model factory that arms a SIGKILL inside the Ray worker: at the worker's 2nd Inductor
# compile, or half-way through its 2nd artifact write (the temporary file holding half the
# bytes), the worker kills its own process, unless the marker says that already happened once.
# The faults are kiln_child's, with a SIGKILL where the child sleeps to be killed.
KILLING_FACTORY = textwrap.dedent('''
    import os, signal

    def build(marker, at, **kwargs):
        from examples.toy_llama import build as toy_build
        from tests.reliability.kiln_child import inject_blob_write_fault, inject_compile_fault

        def die():
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

        if not os.path.exists(marker):
            {"compile": inject_compile_fault, "blob_write": inject_blob_write_fault}[at](2, die)
        return toy_build(**kwargs)
''')


@pytest.mark.parametrize("at", ["compile", pytest.param("blob_write", marks=pytest.mark.slow)])
def test_sigkill_ray_worker(ray_local, tmp_path, figure, at):
    import torch

    from examples.toy_llama import build
    from kiln import CompilationConfig, Orchestrator
    from kiln.orchestrator.driver import WarmupError
    from tests.orchestrator.conftest import TINY

    figure.scenario = {"compile": "kill: Ray worker mid Inductor compile",
                       "blob_write": "kill: Ray worker mid artifact write"}[at]
    factory, marker, root = tmp_path / "killing_model.py", tmp_path / "killed", tmp_path / "root"
    factory.write_text(KILLING_FACTORY)

    def orchestrator() -> Orchestrator:
        return Orchestrator(f"{factory}:build", 1, CompilationConfig(), str(root),
                            model_kwargs={**TINY, "marker": str(marker), "at": at}, progress=False)

    with orchestrator() as orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    figure.fault(marker.stat().st_mtime)
    (failure,) = info.value.failures
    assert failure["rank"] == 0 and "worker process died" in failure["cause"]
    if at == "blob_write":  # the half-written artifact lies under a temporary name only
        (key,) = [p.name for p in root.iterdir()]
        blobs = os.listdir(root / key / "blobs")
        assert len(blobs) == 2 and sum(is_temp_name(b) for b in blobs) == 1, blobs
        assert len(os.listdir(root / key / "refs")) == 1

    eager = build(**TINY)
    with orchestrator() as orch:
        report = orch.warmup([2])
        inputs = eager.example_inputs(3)
        torch.testing.assert_close(orch.run(*inputs), eager(*inputs), rtol=1e-4, atol=MAX_ERR)
    totals = report.totals()
    assert (totals["inductor_compiles"], totals["cache_hits"]) == (1, UNIQUE_PIECES - 1)
    verify_clean(root)
    figure.recovered()
