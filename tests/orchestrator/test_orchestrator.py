"""Driver API on a local Ray cluster with CPU ranks (gloo): warm-ups, run(), failures, skew."""

from __future__ import annotations

import textwrap
import threading

import pytest
import torch

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.driver import WarmupError
from tests.orchestrator.conftest import TINY

MODEL = "examples/toy_llama.py:build"


def orchestrator(root, tp=2, **kwargs) -> Orchestrator:
    return Orchestrator(MODEL, tp, CompilationConfig(), str(root), model_kwargs=TINY, progress=False, **kwargs)


@pytest.fixture(scope="module")
def cold_tp2(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2") / "root"
    with orchestrator(root) as orch:
        report = orch.warmup([1, 2, 4])
        with pytest.raises(ValueError, match="first warm-up"):
            orch.warmup([8])  # the workers hold the [1, 2, 4] config
        from examples.toy_llama import build

        eager = build(**TINY)
        outputs = []
        for n in (1, 3, 6):
            orch.reset_cache()
            eager.reset_cache()
            x = eager.example_inputs(n)
            outputs.append((orch.run(*x), eager(*x)))
    return root, report, outputs


def test_tp2_report_fields_and_compile_once(cold_tp2):
    root, report, _ = cold_tp2
    data = report.to_dict()
    for key in ("config_hash", "cache_key", "wall_seconds", "ranks", "totals"):
        assert key in data
    ranks = data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        for key in ("node", "inductor_compiles", "cache_hits", "cache_misses", "phases"):
            assert key in r
        assert r["node"] == "127.0.0.1" and r["dist_backend"] == "gloo"
        names = [p["name"] for p in r["phases"]]
        assert {"init_process_group", "build_model", "dynamo_trace", "split"} <= set(names)
        for p in r["phases"]:
            assert p["end"] >= p["start"] and p["seconds"] >= 0
        assert r["cudagraphs"] == "cudagraphs: unavailable (no CUDA)"
    assert data["cache_root"] == str(root)  # the root the ranks opened, not ""
    # both ranks trace identical graphs: each of the 2 unique pieces is compiled once in total
    assert sum(r["inductor_compiles"] for r in ranks) == 2
    assert sum(r["cache_hits"] for r in ranks) == 2
    assert ranks[0]["cache_key"] == ranks[1]["cache_key"] == data["cache_key"]


def test_run_at_tp2_equals_tp1(cold_tp2):
    _, _, outputs = cold_tp2
    for got, want in outputs:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_second_warmup_is_all_hits(cold_tp2):
    root, first, _ = cold_tp2
    with orchestrator(root) as orch:
        report = orch.warmup([1, 2, 4])
    totals = report.totals()
    assert totals["inductor_compiles"] == 0 and totals["cache_misses"] == 0
    assert totals["cache_hits"] == 4
    assert report.cache_key == first.cache_key


def test_tp1_warmup(cold_tp2):
    root, _, _ = cold_tp2
    with orchestrator(root, tp=1) as orch:
        report = orch.warmup([1, 2, 4])
    # TP=1 pieces have other shapes than TP=2's: new compiles, same cache root
    assert report.totals()["inductor_compiles"] == 2 and len(report.ranks) == 1


def test_two_concurrent_warmups_compile_each_piece_once(ray_cluster, tmp_path):
    root = tmp_path / "root"
    reports, errors = [], []

    def one():
        try:
            with orchestrator(root, tp=2) as orch:
                reports.append(orch.warmup([2]))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a warm-up never finished"
    assert not errors, errors
    assert len(reports) == 2
    # 2 warm-ups x 2 ranks x the 2 unique pieces: 8 fetches, each piece compiled once in all.
    totals = [r.totals() for r in reports]
    assert sum(t["inductor_compiles"] for t in totals) == 2
    assert sum(t["cache_hits"] for t in totals) == 8 - 2


def test_factor_mismatch_is_refused_naming_the_factor(ray_cluster, tmp_path, monkeypatch):
    import kiln.orchestrator.driver as driver

    real = driver.driver_factors
    monkeypatch.setattr(driver, "driver_factors", lambda device: {**real(device), "torch": "0.0.0+elsewhere"})
    with orchestrator(tmp_path / "root") as orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    message = str(info.value)
    assert "torch differs" in message and "0.0.0+elsewhere" in message and "phase 'verify'" in message


def test_config_hash_mismatch_is_refused(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(CompilationConfig, "compute_hash", lambda self: "0" * 32)
    with orchestrator(tmp_path / "root") as orch, pytest.raises(WarmupError, match="config differs"):
        orch.warmup([2])


FAULTY_MODEL = textwrap.dedent('''
    import os, signal, torch

    class Tiny(torch.nn.Module):
        def __init__(self, marker, kill):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.marker, self.kill = marker, kill

        def forward(self, x):
            return self.lin(x).relu()

        def example_inputs(self, n):
            # kiln asks for example inputs when it starts compiling: die there, once
            from kiln.workers.layers.parallel_state import tp_rank
            if self.kill and tp_rank() == 1 and n > 1 and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return (torch.zeros(n, 8),)

    def build(marker="", kill=False, fail=False):
        from kiln.workers.layers.parallel_state import tp_rank
        if fail and tp_rank() == 1:
            raise ValueError("rank one refuses to build")
        torch.manual_seed(0)
        return Tiny(marker, kill)
''')


@pytest.fixture
def faulty(tmp_path):
    path = tmp_path / "faulty_model.py"
    path.write_text(FAULTY_MODEL)
    return f"{path}:build"


def test_raising_worker_reported_with_rank_and_phase(ray_cluster, tmp_path, faulty):
    orch = Orchestrator(faulty, 2, CompilationConfig(), str(tmp_path / "root"), model_kwargs={"fail": True},
                        progress=False)
    with orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    (failure,) = info.value.failures
    assert failure["rank"] == 1 and failure["phase"] == "build_model"
    assert "ValueError: rank one refuses to build" in failure["cause"]


def test_killed_worker_reported_then_retry_completes(ray_cluster, tmp_path, faulty):
    kwargs = {"marker": str(tmp_path / "killed-once"), "kill": True}
    orch = Orchestrator(faulty, 2, CompilationConfig(), str(tmp_path / "root"), model_kwargs=kwargs, progress=False)
    with orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    (failure,) = info.value.failures
    assert failure["rank"] == 1 and "worker process died" in failure["cause"]

    (tmp_path / "killed-once").unlink()
    orch = Orchestrator(faulty, 2, CompilationConfig(), str(tmp_path / "root"), model_kwargs=kwargs,
                        progress=False, max_retries=1)
    with orch:
        report = orch.warmup([2])
    assert len(report.ranks) == 2
    assert report.failures and report.failures[0]["rank"] == 1  # the first attempt's loss is on record
    assert report.ok and "attempt 1 failed (retried): rank 1" in report.table()
    assert "FAILED" not in report.table()


@pytest.mark.parametrize("tp, placement", [(8, "PACK"), (2, "STRICT_SPREAD")])
def test_placement_that_can_never_fit_fails_at_once(ray_cluster, tmp_path, tp, placement, monkeypatch):
    import kiln.orchestrator.driver as driver

    # The module's cluster is one node with 4 CPUs: neither fits, and no node will join. "At
    # once" is "before any placement group is requested" (which would wait placement_timeout_s).
    def reserve(*args, **kwargs):
        raise AssertionError("a placement group was requested for a placement that can never fit")

    monkeypatch.setattr(driver, "reserve", reserve)
    with orchestrator(tmp_path / "root", tp=tp, placement=placement) as orch, \
            pytest.raises(RuntimeError, match=f"cannot place tp={tp} ranks .* {placement}") as info:
        orch.warmup([2])
    assert "1 node(s), 4 CPU" in str(info.value)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="tp_size"):
        Orchestrator(MODEL, 0)
    with pytest.raises(ValueError, match="model spec"):
        Orchestrator("no-colon-here", 1)
    with pytest.raises(ValueError, match="sizes"):
        Orchestrator(MODEL, 1, progress=False).warmup([0, 2])
