"""Prefetch: a rank's blobs read, verified and unpacked in parallel, under the cache's rules
(only digest-verified bytes, a corrupt blob quarantined and then compiled afresh)."""

from __future__ import annotations

import os

from kiln.cache import CacheStore
from kiln.workers.compilation.artifacts import _pack
from kiln.workers.compilation.prefetch import Prefetch


def packed(tmp_path, name: str) -> bytes:
    src = tmp_path / f"src-{name}"
    (src / "ab").mkdir(parents=True)
    (src / "ab" / f"{name}.py").write_text(f"# kernel {name}\n")
    return _pack(str(src))


def test_blobs_of_the_index_come_verified_and_unpacked_once(tmp_path):
    entry = CacheStore(tmp_path / "root").entry({"model": "m"})
    good, other, bad = packed(tmp_path, "good"), packed(tmp_path, "other"), packed(tmp_path, "bad")
    digests = {}
    for name, data in (("good", good), ("other", other), ("bad", bad)):
        digests[name], _, _ = entry.get_or_compute(f"g-{name}", lambda d=data: d)
    entry.rank_index(0).update({f"piece_{i}/size_sym": {"digest": d} for i, d in enumerate(digests.values())})
    blob = entry.blob_path(digests["bad"])
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # damaged on disk after it was published

    extract = tmp_path / "extract"
    extract.mkdir()
    prefetch = Prefetch(entry, 0, str(extract), threads=3)
    data = prefetch.bytes_of(digests["good"])
    assert data == good
    target = prefetch.take_unpacked(digests["good"], data)
    assert target and open(os.path.join(target, "ab", "good.py")).read() == "# kernel good\n"
    assert prefetch.take_unpacked(digests["good"], data) is None  # each unpacked copy is taken once
    assert prefetch.take_unpacked(digests["other"], bytes(other)) is None  # not the very bytes prefetched
    assert prefetch.bytes_of(digests["bad"]) is None and not blob.exists()  # quarantined, never handed out
    assert prefetch.bytes_of("0" * 32) is None  # not in the index: read when needed
    prefetch.close()
    assert prefetch.blobs == 3 and prefetch.end >= prefetch.start

    # The damaged graph is a miss for get_or_compute with the prefetched bytes: it compiles again.
    digest, again, computed = entry.get_or_compute("g-bad", lambda: bad, preread=prefetch.bytes_of)
    assert computed and again == bad
    # A good one is served from the prefetched bytes, not read again.
    read_before = entry.stats.bytes_read
    digest, served, computed = entry.get_or_compute("g-good", lambda: b"never", preread=prefetch.bytes_of)
    assert not computed and served is data and entry.stats.bytes_read == read_before
