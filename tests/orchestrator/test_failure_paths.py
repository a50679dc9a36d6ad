"""Failure paths end to end, through the real driver on a real local Ray cluster.

`kiln warmup` with a model that fails on one rank writes --report and --trace naming the rank,
the phase and the cause; a warm-up that never answers ends in the driver's timeout, naming the
rank, and the hung worker is torn down. The module's cluster is started by kiln's own
connect(None) with $RAY_ADDRESS pointing nowhere: it must start a fresh cluster on loopback.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.cli import main
from kiln.orchestrator.driver import WarmupError

FAILING_MODEL = textwrap.dedent('''
    import os, time, torch

    class Tiny(torch.nn.Module):
        def __init__(self, hang_marker):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.hang_marker = hang_marker

        def forward(self, x):
            return self.lin(x).relu()

        def example_inputs(self, n):
            # kiln asks for a batch of n > 1 when it starts compiling: hang there, for good
            if self.hang_marker and n > 1:
                with open(self.hang_marker, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(3600)
            return (torch.zeros(n, 8),)

    def build(fail_rank=-1, hang_marker=""):
        from kiln.workers.layers.parallel_state import tp_rank
        if tp_rank() == fail_rank:
            raise ValueError(f"rank {tp_rank()} refuses to build")
        return Tiny(hang_marker)
''')


@pytest.fixture(scope="module")
def local_cluster():
    """The embedded cluster as kiln starts it; $RAY_ADDRESS names a port nothing listens on."""
    import ray

    from kiln.orchestrator.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ADDRESS", "127.0.0.1:1")
        cluster = connect(None, num_cpus=4)
    yield cluster
    ray.shutdown()


@pytest.fixture
def failing_model(tmp_path) -> str:
    path = tmp_path / "failing_model.py"
    path.write_text(FAILING_MODEL)
    return f"{path}:build"


def test_embedded_connect_starts_a_fresh_cluster_on_loopback(local_cluster):
    import ray

    from kiln.orchestrator.cluster import connect

    assert local_cluster.started_here
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    assert host == "127.0.0.1" and port != "1"  # not the one $RAY_ADDRESS named
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 1 and nodes[0]["NodeManagerAddress"] == "127.0.0.1"
    assert not connect(None).started_here  # joined already: used, not started again


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click 8.1
    except TypeError:
        return CliRunner()


def test_kiln_warmup_failing_on_one_rank_writes_report_and_trace(local_cluster, failing_model, tmp_path):
    report, trace = tmp_path / "out" / "report.json", tmp_path / "out" / "trace.json"
    result = _runner().invoke(main, [
        "warmup", failing_model, "--tp", "2", "--sizes", "2", "--model-arg", "fail_rank=1", "--quiet",
        "--cache-root", str(tmp_path / "root"), "--report", str(report), "--trace", str(trace)])
    assert result.exit_code == 1, result.output
    stderr = getattr(result, "stderr", result.output)
    assert "kiln warmup failed: rank 1, phase 'build_model': ValueError: rank 1 refuses to build" in stderr

    data = json.loads(report.read_text())
    (failure,) = data["failures"]  # rank 0 built its shard: only rank 1 failed
    assert (failure["rank"], failure["phase"], failure["attempt"]) == (1, "build_model", 1)
    assert failure["cause"] == "ValueError: rank 1 refuses to build"
    assert "refuses to build" in failure["traceback"]  # the worker's own traceback travelled
    assert data["tp_size"] == 2 and data["model"] == failing_model

    (event,) = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "i"]
    assert event["name"] == "FAILED: rank 1 in build_model" and event["tid"] == 1
    assert event["args"]["cause"] == "ValueError: rank 1 refuses to build"


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


# The worker imports Dynamo and Inductor (~4.5 s on 2 idle cores, more under load) before it
# asks the model for the inputs where it hangs: the timeout must leave room for that, or the
# driver gives up before the hang is reached (seen with two suites sharing the 2 cores).
HANG_TIMEOUT_S = 20


def test_warmup_that_never_answers_times_out_and_is_torn_down(local_cluster, failing_model, tmp_path):
    marker = tmp_path / "hung"
    orch = Orchestrator(failing_model, 1, CompilationConfig(), str(tmp_path / "root"),
                        model_kwargs={"hang_marker": str(marker)}, progress=False, timeout_s=HANG_TIMEOUT_S)
    with orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    (failure,) = info.value.failures
    assert failure == {"rank": 0, "phase": "warmup", "cause": f"no answer within {HANG_TIMEOUT_S} s"}
    assert info.value.report is not None and info.value.report.failures == [{**failure, "attempt": 1}]
    # Positive control: the worker did reach its hang (set-up passed; the warm-up hung), and
    # the driver killed it rather than leaving it to hold its CPU.
    pid = int(marker.read_text())
    deadline = time.monotonic() + 60
    while not _gone(pid):
        assert time.monotonic() < deadline, f"the hung worker {pid} still runs"
        time.sleep(0.1)
    assert orch.workers == [] and not orch.started
