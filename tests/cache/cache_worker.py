"""Child process for the multi-process cache tests (run as `python cache_worker.py MODE ...`).

Modes:
  compute ROOT CALLS START KEYS...
                               from unix time START, get_or_compute each key (shuffled);
                               compute() appends "<key> <pid>" to CALLS and sleeps 0.2 s
  write ROOT PREFIX N SIZE     publish N random blobs of SIZE bytes (written slowly) under graph keys PREFIX0..
  read ROOT STOP               read every visible blob and ref until file STOP exists; must never see a torn one
  slow-write ROOT SIZE         publish one blob, writing it slowly; says "writing" once the temp file has data
  hold-lock ROOT KEY           compute KEY forever while holding its lock; says "computing"
Prints one JSON line of results on success (except for the modes that are killed).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

# The repository root, so `import cache` works however the test runner was started.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kiln.cache.atomic  # noqa: E402
from kiln.cache import CacheStore, digest_bytes  # noqa: E402

FACTORS = {"test": "concurrency", "schema": 1}


def _wait_until(start_at: float) -> None:
    # A common start time, so that the processes really do race for the same keys.
    time.sleep(max(0.0, start_at - time.time()))


def compute_mode(root: str, calls: str, start_at: str, *keys: str) -> None:
    entry = CacheStore(root).entry(FACTORS)
    order = list(keys)
    random.shuffle(order)
    _wait_until(float(start_at))
    results = {}
    for key in order:

        def compute(key: str = key) -> bytes:
            with open(calls, "a") as f:
                f.write(f"{key} {os.getpid()}\n")
            time.sleep(0.2)
            return f"artifact for {key}".encode() * 1000

        digest, data, computed = entry.get_or_compute(key, compute, timeout=60)
        assert digest_bytes(data) == digest
        results[key] = {"digest": digest, "computed": computed}
    print(json.dumps(results), flush=True)


def write_mode(root: str, prefix: str, count: str, size: str) -> None:
    entry = CacheStore(root).entry(FACTORS)
    # Slow writes keep each blob half-written for a while: a non-atomic writer would be caught.
    _slow_down_writes(delay=0.002)
    for i in range(int(count)):
        entry.get_or_compute(f"{prefix}{i}", lambda: os.urandom(int(size)))
    print(json.dumps(entry.stats.as_dict()), flush=True)


def read_mode(root: str, stop: str) -> None:
    """Reads the files directly, not through CacheEntry, so nothing is hidden by verification."""
    entry_dir = Path(root) / CacheStore(root).entry(FACTORS).key
    checked = {"blobs": 0, "refs": 0, "bad": []}
    while not os.path.exists(stop):
        for path in sorted((entry_dir / "blobs").glob("*")):
            if path.name.startswith(kiln.cache.atomic.TEMP_PREFIX):
                continue
            data = _read_if_present(path)
            if data is not None:
                checked["blobs"] += 1
                if digest_bytes(data) != path.name:
                    checked["bad"].append(f"torn blob {path.name}: {len(data)} bytes")
        for path in sorted((entry_dir / "refs").glob("*.json")):
            raw = _read_if_present(path)
            if raw is not None:
                checked["refs"] += 1
                try:
                    ref = json.loads(raw)
                    if not (entry_dir / "blobs" / ref["digest"]).exists():
                        checked["bad"].append(f"ref {path.name} visible before its blob")
                except (ValueError, KeyError) as e:
                    checked["bad"].append(f"torn ref {path.name}: {e}")
    print(json.dumps(checked), flush=True)


def _read_if_present(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _slow_down_writes(delay: float, announce: bool = False) -> None:
    """Make cache.atomic write in 64 KiB chunks, sleeping `delay` s after each; with `announce`,
    print "writing" once the first chunk of a file is out."""

    def slow_write_all(fd: int, view: memoryview) -> None:
        for offset in range(0, len(view), 64 * 1024):
            os.write(fd, view[offset : offset + 64 * 1024])
            if announce and offset == 0:
                print("writing", flush=True)
            time.sleep(delay)

    kiln.cache.atomic._write_all = slow_write_all


def slow_write_mode(root: str, size: str) -> None:
    entry = CacheStore(root).entry(FACTORS)
    _slow_down_writes(delay=0.05, announce=True)  # after entry(), which writes key_factors.json
    entry.get_or_compute("slow", lambda: os.urandom(int(size)))
    print("finished", flush=True)


def hold_lock_mode(root: str, key: str) -> None:
    def compute() -> bytes:
        print("computing", flush=True)
        time.sleep(600)
        return b"never"

    CacheStore(root).entry(FACTORS).get_or_compute(key, compute)


MODES = {
    "compute": compute_mode,
    "write": write_mode,
    "read": read_mode,
    "slow-write": slow_write_mode,
    "hold-lock": hold_lock_mode,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
