"""KILN_PROFILE_DIR: a worker profiles itself from its start to ready and writes rankN.prof/.txt."""

from __future__ import annotations

import pstats

from kiln.workers.worker import KilnWorker


def _work() -> int:
    return sum(i * i for i in range(2000))


def test_the_profile_covers_the_worker_thread_and_is_written_per_rank(tmp_path, monkeypatch):
    root = tmp_path / "profiles"  # not there yet: the worker makes it
    monkeypatch.setenv("KILN_PROFILE_DIR", str(root))
    worker = KilnWorker(3, 4)
    assert worker.profile is not None
    _work()
    worker._write_profile()
    assert worker.profile is None  # stopped: a second warm-up does not write again
    stats = pstats.Stats(str(root / "rank3.prof"))
    assert any(name == "_work" for (_, _, name) in stats.stats), "the profiled thread's calls are missing"
    text = (root / "rank3.txt").read_text()
    assert "function calls" in text and "cumulative" in text
    assert not (root / "rank0.prof").exists()


def test_no_profile_without_the_variable(monkeypatch):
    monkeypatch.delenv("KILN_PROFILE_DIR", raising=False)
    assert KilnWorker(0, 1).profile is None
