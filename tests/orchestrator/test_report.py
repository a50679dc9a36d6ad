"""RunReport: merging worker reports, totals, JSON round trip, table, Chrome trace, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.orchestrator.report import RunReport, ReportError, check_writable, phase_kind, phase_seconds, short_device

REPO_ROOT = Path(__file__).resolve().parents[2]
T0 = 1764100000.0


# The kind each phase's worker tags it with (kiln.workers.protocol.PhaseKind).
KINDS = {"init_process_group": "setup", "build_model": "build", "dynamo_trace": "trace", "split": "trace",
         "first_run": "run", "capture": "capture"}


def _phase(name: str, start: float, seconds: float, **extra) -> dict:
    kind = KINDS.get(name) or name.split()[0]  # "compile piece …" → compile, "load piece …" → load
    return {"name": name, "kind": kind, "start": T0 + start, "end": T0 + start + seconds, "seconds": seconds,
            "extra": extra}


def _worker(rank: int, node: str, *, compiles: int, hits: int, misses: int, t: float = 0.0, **over) -> dict:
    """A worker report like workers produce: four kinds of phases, counters, a cudagraph line."""
    report = {
        "rank": rank, "world_size": 3, "node": node, "node_id": f"id-{node}", "pid": 1000 + rank,
        "device": f"cuda:0 NVIDIA H100 80GB HBM3", "cuda_visible_devices": str(rank),
        "dist_backend": "nccl", "config_hash": "cfg123", "cache_key": "key-abc", "cache_dir": "/c/key-abc",
        "phases": [
            _phase("init_process_group", t + 0.0, 0.5),
            _phase("build_model", t + 0.5, 0.25),
            _phase("dynamo_trace", t + 0.75, 1.0),
            _phase("split", t + 1.75, 0.25),
            _phase("compile piece 0 size sym", t + 2.0, 2.0, graph_key="g0", bytes=1024),
            _phase("load piece 1 size 8", t + 4.0, 0.5),
            _phase("first_run", t + 4.5, 0.5),
            _phase("capture", t + 5.0, 1.5, gib=0.12, graphs=70, sizes=35, mode="PIECEWISE"),
        ],
        "inductor_compiles": compiles, "cache_hits": hits, "cache_misses": misses,
        "artifacts_saved": misses, "artifacts_loaded": hits,
        "bytes_saved": misses * 1024 * 1024, "bytes_loaded": hits * 512 * 1024, "memory_dedup_hits": 1,
        "pieces_total": 5, "pieces_splitting": 2, "pieces_compiled": 3, "unique_pieces": 3,
        "cudagraphs": "cudagraphs: FULL_AND_PIECEWISE, 35 sizes, 0.120 GiB",
        "custom_ops": {"enabled": {"rms_norm": 5}, "disabled": {}},
        "traced_files": ["examples/toy_llama.py"], "warnings": ["PIECEWISE turned into FULL"],
        "wall_seconds": 7.0 + rank, "error": None,
    }
    report.update(over)
    return report


def _failed_worker() -> dict:
    """Rank 2, on a second node, died while compiling: no counters, two phases, an error."""
    return {
        "rank": 2, "world_size": 3, "node": "10.0.0.2", "device": "cpu", "cache_key": "key-abc",
        "phases": [_phase("init_process_group", 0.2, 0.3), _phase("compile piece 2 size sym", 0.5, 1.0)],
        "warnings": ["PIECEWISE turned into FULL", "custom op rms_norm disabled"],
        "error": {"phase": "compile piece 2 size sym", "type": "RuntimeError", "message": "boom",
                  "traceback": "Traceback ...\nRuntimeError: boom"},
    }


def _merge(workers: list[dict], **over) -> RunReport:
    kwargs = dict(config_hash="cfg123", cache_root="/c", model="examples.toy_llama:build", tp_size=3,
                  sizes=[8, 1, 4], wall_seconds=12.5, started_at=T0 - 2.0,
                  orchestration={"cluster_start": 1.0, "actors_ready": 0.5, "broadcast": 0.25})
    kwargs.update(over)
    return RunReport.merge(workers, **kwargs)


@pytest.fixture
def workers() -> list[dict]:
    # Out of rank order on purpose: merge must sort.
    return [_failed_worker(),
            _worker(1, "10.0.0.1", compiles=0, hits=3, misses=0, t=0.1),
            _worker(0, "10.0.0.1", compiles=3, hits=0, misses=3)]


@pytest.fixture
def report(workers) -> RunReport:
    return _merge(workers, failures=[{"rank": None, "phase": "broadcast", "cause": "actor 3 lost"}])


def test_phase_kinds_and_seconds(workers):
    # Kinds come from the phase, never from parsing its name; an untagged or unknown kind is "other".
    assert phase_kind({"name": "compile piece 3 size 8", "kind": "compile"}) == "compile"
    assert phase_kind({"name": "compile piece 3 size 8"}) == "other"
    assert phase_kind({"name": "x", "kind": "bogus"}) == "other"
    rank0 = workers[2]
    assert phase_seconds(rank0, "build") == pytest.approx(0.25)
    assert phase_seconds(rank0, "trace") == pytest.approx(1.25)
    assert phase_seconds(rank0, "compile") == pytest.approx(2.0)
    assert phase_seconds(rank0, "load") == pytest.approx(0.5)
    assert phase_seconds(rank0, "capture") == pytest.approx(1.5)
    assert phase_seconds(rank0, "setup") == pytest.approx(0.5)
    assert phase_seconds(rank0, "run") == pytest.approx(0.5)
    assert phase_seconds(rank0, "other") == 0.0
    assert RunReport.phase_seconds({}, "compile") == 0.0
    with pytest.raises(ValueError):
        phase_seconds(rank0, "bogus")


def test_merge_sorts_ranks_and_collects_failures(report):
    assert [r["rank"] for r in report.ranks] == [0, 1, 2]
    assert report.cache_key == "key-abc"
    assert report.sizes == [1, 4, 8]
    assert report.tp_size == 3 and report.model == "examples.toy_llama:build"
    # The failed rank's missing counters read as 0.
    assert report.ranks[2]["inductor_compiles"] == 0 and report.ranks[2]["bytes_saved"] == 0
    assert report.failures == [
        {"rank": 2, "phase": "compile piece 2 size sym", "cause": "RuntimeError: boom"},
        {"rank": None, "phase": "broadcast", "cause": "actor 3 lost"},
    ]
    assert not report.ok


def test_merge_does_not_mutate_worker_reports(workers):
    before = json.dumps(workers, sort_keys=True)
    _merge(workers)
    assert json.dumps(workers, sort_keys=True) == before


def test_merge_drops_duplicate_failures(workers):
    dup = {"rank": 2, "phase": "compile piece 2 size sym", "cause": "RuntimeError: boom", "traceback": "tb"}
    failures = _merge(workers, failures=[dup, dict(dup)]).failures
    assert failures == [dup]  # the driver's copy adds its traceback to the worker's entry


def test_level2_compile_phase_fills_the_compile_column():
    # Levels 1 and 2 record the whole compile as one phase named "compile".
    worker = _worker(0, "n", compiles=1, hits=0, misses=1, device="cpu",
                     phases=[_phase("dynamo_trace", 0.0, 1.0), _phase("compile", 1.0, 3.0)])
    row = _merge([worker]).table().splitlines()[2].split()
    assert row[:8] == ["0", "n", "cpu", "0.00", "1.00", "3.00", "0.00", "0.00"]  # …, build, trace, compile, load, capture


def test_retried_failures_do_not_fail_the_run(workers):
    healthy = workers[1:]  # ranks 0 and 1, no errors: the final attempt succeeded
    lost = {"rank": 1, "phase": "warmup", "cause": "worker process died", "attempt": 1, "retried": True}
    report = _merge(healthy, failures=[lost])
    assert report.ok and report.failures == [lost]
    text = report.table()
    assert "attempt 1 failed (retried): rank 1 in warmup: worker process died" in text
    assert "FAILED" not in text
    # The same failure again in the final attempt is its own entry, and fails the run.
    final = {**lost, "attempt": 2, "retried": False}
    again = _merge(healthy, failures=[final, lost])
    assert not again.ok and again.failures == [lost, final]
    assert "FAILED rank 1 in warmup: worker process died" in again.table()


def test_totals(report):
    t = report.totals()
    assert t["inductor_compiles"] == 3
    assert t["cache_hits"] == 3 and t["cache_misses"] == 3
    assert t["artifacts_saved"] == 3 and t["artifacts_loaded"] == 3
    assert t["bytes_saved"] == 3 * 1024 * 1024 and t["bytes_loaded"] == 3 * 512 * 1024
    assert t["memory_dedup_hits"] == 2
    assert t["wall_seconds"] == 8.0  # the slowest rank (rank 1); rank 2 reported none


def test_cache_key_mixed_when_ranks_differ(workers):
    workers[1]["cache_key"] = "key-other"
    report = _merge(workers)
    assert report.cache_key == "mixed"
    assert {r["cache_key"] for r in report.ranks} == {"key-abc", "key-other"}


def test_cache_key_ignores_ranks_without_one(workers):
    del workers[0]["cache_key"]
    assert _merge(workers).cache_key == "key-abc"
    assert _merge([{"rank": 0, "error": {"type": "E"}}]).cache_key == ""


def test_json_round_trip(report, tmp_path):
    path = report.to_json(tmp_path / "out" / "report.json")
    data = json.loads(path.read_text())
    for key in ("config_hash", "cache_key", "wall_seconds", "ranks", "totals", "tp_size", "model", "sizes",
                "orchestration", "failures", "cache_root"):
        assert key in data, key
    assert data["totals"]["inductor_compiles"] == 3
    for rank in data["ranks"]:
        for key in ("rank", "node", "inductor_compiles", "cache_hits", "cache_misses", "phases"):
            assert key in rank, key
        for phase in rank["phases"]:
            assert {"name", "start", "end", "seconds"} <= set(phase)
    loaded = RunReport.from_json(path)
    assert loaded == report
    # The driver's steps stay in the order they ran, not alphabetical.
    assert list(loaded.orchestration) == ["cluster_start", "actors_ready", "broadcast"]
    assert loaded.totals() == report.totals()


def test_from_json_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ReportError, match=str(missing)):
        RunReport.from_json(missing)


def test_table_rows_and_numbers(report):
    text = report.table()
    lines = text.splitlines()
    rank_lines = [ln for ln in lines if ln.split() and ln.split()[0].rstrip("!") in ("0", "1", "2")]
    assert len(rank_lines) == 3
    total = [ln for ln in lines if ln.startswith("TOTAL")]
    assert len(total) == 1
    # TOTAL: build 0.25*2, trace 1.25*2, compile 2+2+1, load 0.5*2, capture 1.5*2, compiles 3,
    # hits 3, misses 3, saved 3 MiB, loaded 1.5 MiB, wall max 8.
    assert total[0].split()[1:] == ["0.50", "2.50", "5.00", "1.00", "3.00", "3", "3", "3", "3.00", "1.50", "8.00"]
    assert rank_lines[0].split()[:4] == ["0", "10.0.0.1", "cuda:0", "H100"]
    assert rank_lines[2].startswith("2!")  # the failed rank is marked
    # Columns line up: every table line is as wide as the header.
    header = lines[0]
    assert header.split()[:3] == ["rank", "node", "device"]
    assert all(len(ln) == len(header) for ln in rank_lines + total)


def test_table_footer(report):
    text = report.table()
    assert "config hash: cfg123" in text
    assert "cache key:   key-abc" in text
    assert "cache root:  /c" in text
    assert "wall time:   12.50 s (orchestration 1.75 s" in text
    assert "cudagraphs:  FULL_AND_PIECEWISE, 35 sizes, 0.120 GiB (ranks 0,1)" in text
    assert "cudagraphs:  unknown (ranks 2)" in text
    assert "warning (x3): PIECEWISE turned into FULL" in text
    assert "warning: custom op rms_norm disabled" in text
    assert "FAILED rank 2 in compile piece 2 size sym: RuntimeError: boom" in text
    assert "FAILED driver in broadcast: actor 3 lost" in text


def test_lazy_capture_in_footer_and_trace(workers):
    per_size = [
        {"size": 1, "start": T0 + 7.0, "end": T0 + 7.5, "seconds": 0.5, "after_ready_s": 0.5, "state": "captured",
         "error": None},
        {"size": 2, "start": T0 + 7.5, "end": T0 + 7.75, "seconds": 0.25, "after_ready_s": 0.75, "state": "failed",
         "error": "RuntimeError: capture broke"},
        {"size": 4, "start": 0.0, "end": 0.0, "seconds": 0.0, "after_ready_s": 0.0, "state": "pending", "error": None},
    ]
    workers[2]["lazy_capture"] = {"capture": "lazy", "order": [1, 2, 4], "sizes": 3, "captured": 1,
                                  "failed": {2: "RuntimeError: capture broke"}, "done": False,
                                  "ready_at": T0 + 6.5, "last_after_ready_s": 0.5, "per_size": per_size}
    report = _merge(workers)
    text = report.table()
    assert "capture:     rank 0: lazy, 1/3 sizes captured by the report, last at ready +0.50 s (still capturing)" in text
    assert "sizes@after ready(seconds): 1@+0.50s(0.50s)" in text
    assert "capture:     rank 0: size 2 FAILED, runs without graphs: RuntimeError: capture broke" in text
    again = RunReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert "size 2 FAILED" in again.table()  # the failed sizes' keys are strings after JSON
    names = [e["name"] for e in report.chrome_trace()["traceEvents"] if e.get("ph") == "X"]
    assert "lazy capture size 1" in names and "lazy capture size 2" in names
    assert "lazy capture size 4" not in names


def test_footer_says_what_loading_read_and_how_fast(report):
    # Rank 1 loaded 3 artifacts of 512 KiB in its 0.5 s load phase; rank 0 loaded nothing in its
    # 0.5 s (a slow load of nothing shows as 0 MiB/s); rank 2 died before loading.
    lines = [ln for ln in report.table().splitlines() if ln.startswith("load:")]
    assert lines == ["load:        1.50 MiB in 1.00 s, 1.50 MiB/s (rank 0 0.00 MiB in 0.50 s, 0.00 MiB/s, "
                     "rank 1 1.50 MiB in 0.50 s, 3.00 MiB/s)"]


def test_footer_load_line_for_one_rank_and_none_without_loads(workers):
    one = _merge([workers[1]])
    assert "load:        1.50 MiB in 0.50 s, 3.00 MiB/s\n" in one.table() + "\n"
    for w in workers:
        w["phases"] = [p for p in w["phases"] if p["kind"] != "load"]
        w["bytes_loaded"] = 0
    assert "load:" not in _merge(workers).table()


def test_footer_counts_autotuning(workers):
    assert "autotuning:  0 benchmark runs by Inductor\n" in _merge(workers).table()
    workers[1]["autotune_benchmarks"], workers[2]["autotune_benchmarks"] = 0, 25
    report = _merge(workers)
    assert report.totals()["autotune_benchmarks"] == 25
    assert "autotuning:  25 benchmark runs by Inductor (ranks 0: 25)\n" in report.table()
    workers[2]["autotune_benchmarks"] = 1
    assert "autotuning:  1 benchmark run by Inductor\n" in _merge([workers[2]]).table() + "\n"


def test_short_device():
    assert short_device("cuda:0 NVIDIA H100 80GB HBM3") == "cuda:0 H100 80GB"
    assert short_device("cpu") == "cpu"
    assert short_device(None) == "?"


def test_chrome_trace(report, tmp_path):
    path = report.write_chrome_trace(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    # The driver-level failure no rank reported gets a track of its own.
    assert procs == {0: "node 10.0.0.1", 1: "node 10.0.0.2", 2: "failures"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads == {(0, 0): "rank 0 (cuda:0 NVIDIA H100 80GB HBM3)",
                       (0, 1): "rank 1 (cuda:0 NVIDIA H100 80GB HBM3)", (1, 2): "rank 2 (cpu)"}

    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 8 + 8 + 2
    assert all(e["ts"] >= 0 and e["dur"] >= 1 for e in events if "ts" in e and "dur" in e)
    assert all(e["ts"] >= 0 for e in events if e["ph"] != "M")
    assert min(e["ts"] for e in complete) == 0  # relative to the earliest start
    by_name = {(e["tid"], e["name"]): e for e in complete}
    compile0 = by_name[(0, "compile piece 0 size sym")]
    assert compile0["cat"] == "compile" and compile0["ts"] == 2_000_000 and compile0["dur"] == 2_000_000
    assert compile0["args"] == {"graph_key": "g0", "bytes": 1024}
    assert by_name[(1, "dynamo_trace")]["cat"] == "trace"
    assert by_name[(2, "init_process_group")]["cat"] == "setup"

    errors = [e for e in events if e["ph"] == "i"]
    assert len(errors) == 2
    assert errors[0]["name"] == "error: RuntimeError" and (errors[0]["pid"], errors[0]["tid"]) == (1, 2)
    assert errors[0]["ts"] == 1_500_000  # where rank 2's last phase ended
    assert errors[0]["args"]["message"] == "boom"
    assert errors[1]["name"] == "FAILED: driver in broadcast" and errors[1]["pid"] == 2
    assert errors[1]["args"] == {"phase": "broadcast", "cause": "actor 3 lost"}


def test_chrome_trace_is_deterministic(workers):
    assert _merge(workers).chrome_trace() == _merge(list(reversed(workers))).chrome_trace()


def test_chrome_trace_min_duration_and_no_phases():
    worker = _worker(0, "n", compiles=0, hits=0, misses=0, phases=[_phase("split", 0.0, 0.0)])
    trace = _merge([worker, {"rank": 1, "node": "n", "error": {"type": "KeyError"}}]).chrome_trace()
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [e["dur"] for e in complete] == [1.0]
    errors = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert [(e["tid"], e["ts"]) for e in errors] == [(1, 0.0)]


def test_no_reports_at_all_still_renders():
    report = _merge([], failures=[{"rank": None, "phase": "actors_ready", "cause": "no GPUs"}])
    assert report.totals()["inductor_compiles"] == 0 and report.cache_key == ""
    assert report.table().splitlines()[3].startswith("TOTAL")
    # No rank to draw, but the trace still names what failed.
    events = report.chrome_trace()["traceEvents"]
    assert [e["name"] for e in events if e["ph"] == "i"] == ["FAILED: driver in actors_ready"]
    assert [e["args"]["cause"] for e in events if e["ph"] == "i"] == ["no GPUs"]


def test_atomic_write_leaves_no_temp_files(report, tmp_path):
    target = tmp_path / "deep" / "er" / "report.json"
    report.to_json(target)
    report.to_json(target)  # overwrite in place
    report.write_chrome_trace(target.with_name("trace.json"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json", "trace.json"]


def test_write_under_a_file_names_the_path(report, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    bad = blocker / "sub" / "report.json"
    with pytest.raises(ReportError, match=str(blocker)) as info:
        report.to_json(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(OSError, match=str(blocker)):  # ReportError is an OSError for callers
        report.write_chrome_trace(blocker / "trace.json")
    assert os.listdir(tmp_path) == ["blocker"]


def test_check_writable_creates_nothing_and_names_the_problem(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "report.json")  # parents may be missing
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(ReportError, match=f"{blocker} exists and is not a directory"):
        check_writable(blocker / "report.json")
    with pytest.raises(ReportError, match="is a directory"):
        check_writable(tmp_path)


def test_import_pulls_in_neither_torch_nor_ray():
    code = "import kiln.orchestrator.report, sys; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
