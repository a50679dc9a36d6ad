"""Child process for the multi-process cache tests (run as `python cache_worker.py MODE ...`).

Modes:
  compute ROOT CALLS GO KEYS...
                               say "ready", wait for file GO, then get_or_compute each key
                               (shuffled); compute() appends "<key> <pid>" to CALLS and sleeps 0.2 s
  write ROOT PREFIX N SIZE PASSES
                               publish N random blobs of SIZE bytes under graph keys PREFIX0..;
                               half-way through each blob, wait until the reader has made two
                               more passes (its count is in file PASSES): the write overlaps one
  read ROOT STOP PASSES        read every visible blob and ref until file STOP exists, counting
                               passes in file PASSES; must never see a torn one
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


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"cache_worker: gave up waiting for {what}")
        time.sleep(0.005)


def compute_mode(root: str, calls: str, go: str, *keys: str) -> None:
    entry = CacheStore(root).entry(FACTORS)
    order = list(keys)
    random.shuffle(order)
    # All processes start together, so that they really do race for the same keys.
    print("ready", flush=True)
    _wait_for(lambda: os.path.exists(go), f"the start signal {go}")
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


def _passes(path: str) -> int:
    try:
        return int(Path(path).read_text() or 0)
    except FileNotFoundError:
        return 0


def write_mode(root: str, prefix: str, count: str, size: str, passes: str) -> None:
    entry = CacheStore(root).entry(FACTORS)
    # Each blob stays half-written until the reader has made two more passes over the entry,
    # so at least one whole pass sees it half-done: a non-atomic writer would be caught.
    _slow_down_writes(delay=0.0, midway=lambda: _wait_for_passes(passes))
    for i in range(int(count)):
        entry.get_or_compute(f"{prefix}{i}", lambda: os.urandom(int(size)))
    print(json.dumps(entry.stats.as_dict()), flush=True)


def _wait_for_passes(passes: str) -> None:
    start = _passes(passes)
    _wait_for(lambda: _passes(passes) >= start + 2, "two passes of the reader")


def read_mode(root: str, stop: str, passes: str) -> None:
    """Reads the files directly, not through CacheEntry, so nothing is hidden by verification."""
    entry_dir = Path(root) / CacheStore(root).entry(FACTORS).key
    checked = {"blobs": 0, "refs": 0, "bad": [], "passes": 0, "passes_during_a_write": 0}
    while not os.path.exists(stop):
        if any(p.name.startswith(kiln.cache.atomic.TEMP_PREFIX) for p in (entry_dir / "blobs").glob("*")):
            checked["passes_during_a_write"] += 1
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
        checked["passes"] += 1
        tmp = f"{passes}.tmp"
        Path(tmp).write_text(str(checked["passes"]))
        os.replace(tmp, passes)
    print(json.dumps(checked), flush=True)


def _read_if_present(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _slow_down_writes(delay: float, announce: bool = False, midway=None) -> None:
    """Make cache.atomic write in 64 KiB chunks, sleeping `delay` s after each; with `announce`,
    print "writing" once the first chunk of a file is out; call `midway()` half-way through
    each file of more than one chunk (a blob, not a ref)."""
    chunk = 64 * 1024

    def slow_write_all(fd: int, view: memoryview) -> None:
        half = (len(view) // 2) // chunk * chunk if len(view) > chunk else None
        for offset in range(0, len(view), chunk):
            if midway is not None and offset == half:
                midway()
            os.write(fd, view[offset : offset + chunk])
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
