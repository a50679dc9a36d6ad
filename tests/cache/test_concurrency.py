"""Several processes on one cache: compute once, no torn reads, crashes leave nothing half-done."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time

import pytest

from kiln.cache import CacheStore, digest_bytes
from kiln.cache.atomic import TEMP_PREFIX
from kiln.cache.maintenance import verify

KEYS = [f"graph{i}" for i in range(5)]


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)


def test_eight_processes_compute_each_key_once(root, tmp_path, workers, worker_factors):
    calls, go = tmp_path / "calls", tmp_path / "go"
    procs = [workers.start("compute", root, calls, go, *KEYS) for _ in range(8)]
    for p in procs:  # all eight have imported and opened the store: start them together
        workers.wait_for_line(p, "ready", timeout=120)
    go.touch()
    results = [json.loads(workers.finish(p, timeout=120).strip().splitlines()[-1]) for p in procs]

    computed_by = collections.Counter(line.split()[0] for line in calls.read_text().splitlines())
    assert computed_by == {key: 1 for key in KEYS}, "each key must be computed by exactly one process"
    for key in KEYS:
        assert len({r[key]["digest"] for r in results}) == 1
        assert sum(r[key]["computed"] for r in results) == 1

    entry = CacheStore(root).entry(worker_factors)
    for key in KEYS:
        digest, data = entry.lookup(key)
        assert digest_bytes(data) == digest
    blobs = entry.path / "blobs"
    assert all(digest_bytes((blobs / name).read_bytes()) == name for name in os.listdir(blobs))
    assert not [f for f in files_under(root) if os.path.basename(f).startswith(TEMP_PREFIX)]
    assert verify(root).ok


def test_threads_of_one_process_compute_once(store):
    entry = store.entry({"threads": True})
    calls = []

    def compute() -> bytes:
        calls.append(threading.get_ident())
        time.sleep(0.2)
        return b"once"

    results = []
    threads = [threading.Thread(target=lambda: results.append(entry.get_or_compute("g", compute, timeout=10))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(computed for _, _, computed in results) == [False] * 5 + [True]


def test_readers_never_see_a_torn_file(root, tmp_path, workers, worker_factors):
    CacheStore(root).entry(worker_factors)  # so the reader finds the entry directory at once
    stop, passes = tmp_path / "stop", tmp_path / "passes"
    reader = workers.start("read", root, stop, passes)
    # Each blob waits half-written for two passes of the reader (no clock): they overlap.
    writers = [workers.start("write", root, f"w{i}-", 6, 1 << 20, passes) for i in range(2)]
    for w in writers:
        workers.finish(w, timeout=120)
    stop.touch()
    seen = json.loads(workers.finish(reader, timeout=60))
    assert seen["bad"] == []
    # Positive controls: the reader saw writes in progress, and the blobs and refs they made.
    assert seen["passes_during_a_write"] > 0
    assert seen["blobs"] > 0 and seen["refs"] > 0
    assert verify(root).ok


def test_sigkill_mid_write_leaves_no_partial_file(root, workers, worker_factors):
    proc = workers.start("slow-write", root, 4 << 20)  # 64 chunks, 50 ms apart: about 3 s
    workers.wait_for_line(proc, "writing")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)

    entry_dir = root / CacheStore(root).entry(worker_factors).key
    blobs = os.listdir(entry_dir / "blobs")
    assert blobs and all(name.startswith(TEMP_PREFIX) for name in blobs), blobs
    assert not (entry_dir / "refs").exists() or os.listdir(entry_dir / "refs") == []

    # The dead writer held the lock; the OS released it, so this neither deadlocks nor waits.
    entry = CacheStore(root).entry(worker_factors)
    digest, data, computed = entry.get_or_compute("slow", lambda: b"recomputed", timeout=5)
    assert (data, computed) == (b"recomputed", True)

    assert verify(root).temp_removed == []  # young temp files might belong to a live writer
    report = verify(root, stale_temp_seconds=0)
    assert report.ok and len(report.temp_removed) == 1
    assert not [n for n in os.listdir(entry_dir / "blobs") if n.startswith(TEMP_PREFIX)]


def test_sigkill_while_computing_releases_the_lock(root, workers, worker_factors):
    proc = workers.start("hold-lock", root, "held")
    workers.wait_for_line(proc, "computing")
    entry = CacheStore(root).entry(worker_factors)
    with pytest.raises(TimeoutError, match="held.lock"):
        entry.get_or_compute("held", lambda: pytest.fail("the lock is held"), timeout=0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert entry.get_or_compute("held", lambda: b"mine", timeout=5) == (digest_bytes(b"mine"), b"mine", True)
