"""CacheStore / CacheEntry / RankIndex in one process: round trips, stats, corruption, copies."""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import filelock
import pytest
import xxhash

import kiln.cache.rank_index
import kiln.cache.store
from kiln.cache import CacheError, CacheStore, atomic_write_json, canonical_json, digest_bytes, key_from_factors
from kiln.cache.atomic import TEMP_PREFIX
from kiln.cache.records import make_ref


def quarantined(entry) -> list[str]:
    q = entry.path / "quarantine"
    return sorted(os.listdir(q)) if q.exists() else []


def temp_files(root) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.startswith(TEMP_PREFIX)]


# ----- keys and digests -----


def test_key_is_xxh3_128_of_canonical_json():
    factors = {"b": [1, 2], "a": {"y": 1, "x": "s"}}
    key = key_from_factors(factors)
    assert key == xxhash.xxh3_128_hexdigest(b'{"a":{"x":"s","y":1},"b":[1,2]}')
    assert canonical_json(factors) == '{"a":{"x":"s","y":1},"b":[1,2]}'
    assert key == key_from_factors({"a": {"x": "s", "y": 1}, "b": [1, 2]})  # order does not matter
    assert len(key) == 32 and int(key, 16) >= 0


def test_factors_must_be_plain_json(store):
    with pytest.raises(CacheError, match=r"factors\.env\.PATH_OBJ"):
        store.entry({"env": {"PATH_OBJ": object()}})
    with pytest.raises(CacheError, match="key 1 is not a string"):
        store.entry({1: "x"})
    with pytest.raises(CacheError, match="must be a dict"):
        store.entry(["not", "a", "dict"])


def test_entry_layout_and_key_factors(store, root):
    factors = {"config_hash": "c0ffee", "compiler": {"torch": "2.13"}}
    entry = store.entry(factors)
    assert entry.path == root / entry.key
    assert entry.key == key_from_factors(factors)
    assert json.loads((entry.path / "key_factors.json").read_text()) == factors
    assert (entry.path / "last_used").exists()
    assert store.keys() == [entry.key]
    assert oct(os.stat(entry.path).st_mode & 0o777) == oct(0o700)


def test_keys_lists_only_entries(store, root):
    entry = store.entry({"a": 1})
    (root / "not-a-key").mkdir()
    (root / (".trash-" + "0" * 32 + "-1")).mkdir()
    (root / ("f" * 32)).write_text("a file, not an entry")
    assert store.keys() == [entry.key]


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_ROOT", str(tmp_path / "from-env"))
    assert CacheStore().root == tmp_path / "from-env"
    monkeypatch.delenv("KILN_CACHE_ROOT")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert CacheStore().root == tmp_path / "home" / ".cache" / "kiln"


# ----- blobs -----


def test_put_get_round_trip_and_digest_naming(entry):
    data = os.urandom(100_000)
    digest = entry.put_blob(data)
    assert digest == xxhash.xxh3_128_hexdigest(data) == digest_bytes(data)
    assert entry.blob_path(digest) == entry.path / "blobs" / digest
    assert entry.blob_path(digest).read_bytes() == data
    assert entry.get_blob(digest) == data
    assert entry.put_blob(data) == digest  # already there: not written again
    assert entry.stats.blobs_written == 1 and entry.stats.bytes_written == len(data)
    assert entry.get_blob(digest_bytes(b"absent")) is None
    assert temp_files(entry.path) == []
    assert oct(os.stat(entry.blob_path(digest)).st_mode & 0o777) == oct(0o600)


def test_put_blob_takes_bytes_only(entry):
    with pytest.raises(TypeError, match="str"):
        entry.put_blob("text is not bytes")
    assert entry.put_blob(bytearray(b"ok")) == digest_bytes(b"ok")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 31, "g" * 32, 7])
def test_bad_digest_rejected(entry, bad):
    with pytest.raises(ValueError, match="invalid blob digest"):
        entry.get_blob(bad)


def test_flipped_byte_quarantined_and_recomputed(entry, caplog):
    digest, data, computed = entry.get_or_compute("g", lambda: b"x" * 1000)
    path = entry.blob_path(digest)
    corrupted = bytearray(path.read_bytes())
    corrupted[500] ^= 0x01
    path.write_bytes(corrupted)

    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        assert entry.get_blob(digest) is None
    assert str(path) in caplog.text
    assert not path.exists()
    assert any(name.startswith(digest + ".") for name in quarantined(entry))
    assert entry.stats.quarantined == 1

    # The ref now names a missing blob: lookup quarantines it too, and the graph is recomputed.
    assert entry.lookup("g") is None
    assert entry.get_or_compute("g", lambda: b"x" * 1000) == (digest, data, True)
    assert entry.get_blob(digest) == data


def test_truncated_blob_detected(entry):
    digest, _, _ = entry.get_or_compute("g", lambda: b"y" * 4096)
    with open(entry.blob_path(digest), "r+b") as f:
        f.truncate(100)
    assert entry.lookup("g") is None
    assert not entry.blob_path(digest).exists()
    assert not (entry.path / "refs" / "g.json").exists()
    # put_blob notices the wrong size and rewrites rather than trusting the file.
    with open(entry.blob_path(entry.put_blob(b"z" * 64)), "r+b") as f:
        f.truncate(10)
    entry.put_blob(b"z" * 64)
    assert entry.get_blob(digest_bytes(b"z" * 64)) == b"z" * 64


# ----- refs and get_or_compute -----


def test_lookup_and_get_or_compute_stats(entry):
    assert entry.lookup("graph-1") is None
    assert entry.stats.misses == 1
    calls = []
    digest, data, computed = entry.get_or_compute("graph-1", lambda: calls.append(1) or b"compiled")
    assert (data, computed, calls) == (b"compiled", True, [1])
    assert entry.stats.misses == 2
    assert entry.get_or_compute("graph-1", lambda: pytest.fail("must not recompute")) == (digest, data, False)
    assert entry.lookup("graph-1") == (digest, data)
    assert entry.stats.hits == 2
    ref = json.loads((entry.path / "refs" / "graph-1.json").read_text())
    assert ref["digest"] == digest and ref["size"] == len(data) and ref["created"] > 0
    assert entry.stats.as_dict() == {
        "hits": 2, "misses": 2, "bytes_read": 2 * len(data), "bytes_written": len(data), "blobs_written": 1, "quarantined": 0,
    }


def test_compute_raising_writes_nothing_and_releases_lock(entry):
    def boom() -> bytes:
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError, match="compile failed"):
        entry.get_or_compute("g", boom)
    assert not (entry.path / "refs" / "g.json").exists()
    assert not (entry.path / "blobs").exists() or os.listdir(entry.path / "blobs") == []
    # The lock is free again: a bounded wait succeeds at once.
    assert entry.get_or_compute("g", lambda: b"ok", timeout=1)[1:] == (b"ok", True)


def test_compute_must_return_bytes(entry):
    with pytest.raises(TypeError, match="'g'.*str"):
        entry.get_or_compute("g", lambda: "not bytes")


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "..", "x" * 129, "sp ace", "ü"])
def test_bad_graph_key_rejected(entry, bad):
    with pytest.raises(ValueError, match="invalid graph_key"):
        entry.get_or_compute(bad, lambda: b"")
    with pytest.raises(ValueError, match="invalid graph_key"):
        entry.lookup(bad)


@pytest.mark.parametrize(
    "content", [b"{not json", b"[]", b'{"digest": "../../x", "size": 1, "created": 0}', b'{"digest": "' + b"0" * 32 + b'"}']
)
def test_malformed_ref_quarantined(entry, content, caplog):
    entry.get_or_compute("g", lambda: b"data")
    ref = entry.path / "refs" / "g.json"
    ref.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        assert entry.lookup("g") is None
    assert str(ref) in caplog.text
    assert not ref.exists()
    assert any(n.startswith("g.json.") for n in quarantined(entry))
    assert entry.get_or_compute("g", lambda: b"data")[2] is True


def test_invalidate_quarantines_ref_and_blob(entry, caplog):
    digest, _, _ = entry.get_or_compute("g", lambda: b"does not deserialize")
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        entry.invalidate("g", "pickle error")
    assert "pickle error" in caplog.text
    assert entry.lookup("g") is None and not entry.blob_path(digest).exists()
    assert entry.get_or_compute("g", lambda: b"fresh")[1:] == (b"fresh", True)
    entry.invalidate("never-published", "nothing to do")  # no ref: a no-op


# ----- key_factors.json -----


@pytest.mark.parametrize("content", [b'{"config": "tampered"}', b"{broken", b"[1, 2]"])
def test_tampered_key_factors_quarantined_and_rewritten(store, content, caplog):
    factors = {"config": "original"}
    entry = store.entry(factors)
    path = entry.path / "key_factors.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        entry = store.entry(factors)
    assert str(path) in caplog.text
    assert json.loads(path.read_text()) == factors
    assert any(n.startswith("key_factors.json.") for n in quarantined(entry))
    assert entry.stats.quarantined == 1


# ----- rank indexes -----


def test_rank_index_merges_and_stays_relative(entry):
    index = entry.rank_index(3)
    assert index.path == entry.path / "rank_3" / "index.json"
    assert index.read() == {}
    d1, d2 = entry.put_blob(b"one"), entry.put_blob(b"two")
    index.update({"piece0/8": {"digest": d1, "graph_key": "g0", "seconds": 1.5}})
    index.update({"piece1/8": {"digest": d2}, "piece0/8": {"digest": d2}})
    assert index.read() == {"piece0/8": {"digest": d2}, "piece1/8": {"digest": d2}}
    doc = json.loads(index.path.read_text())
    assert doc["schema"] == 1 and set(doc["entries"]) == {"piece0/8", "piece1/8"}
    assert str(entry.path) not in index.path.read_text()


def test_rank_index_rejects_bad_entries(entry):
    index = entry.rank_index(0)
    good = entry.put_blob(b"x")
    with pytest.raises(ValueError, match="absolute path"):
        index.update({"p": {"digest": good, "file": os.path.join(os.sep, "somewhere", "blob")}})
    with pytest.raises(ValueError, match="'p'.*digest"):
        index.update({"p": {"graph_key": "g"}})
    with pytest.raises(ValueError, match="invalid rank"):
        entry.rank_index(-1)
    assert index.read() == {}


@pytest.mark.parametrize("content", [b"{oops", b'{"schema": 2, "entries": {}}', b'{"schema": 1, "entries": {"p": {"digest": 5}}}'])
def test_malformed_rank_index_quarantined(entry, content, caplog):
    index = entry.rank_index(1)
    index.update({"p": {"digest": entry.put_blob(b"x")}})
    index.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        assert index.read() == {}
    assert str(index.path) in caplog.text
    assert any(n.startswith("rank_1.index.json.") for n in quarantined(entry))
    index.update({"q": {"digest": entry.put_blob(b"y")}})  # rebuilt from scratch
    assert list(index.read()) == ["q"]


# ----- relocation -----


def test_copied_root_loads_the_same(store, root, tmp_path):
    factors = {"config": "copied"}
    entry = store.entry(factors)
    digest, data, _ = entry.get_or_compute("g", lambda: os.urandom(10_000))
    entry.rank_index(0).update({"p": {"digest": digest, "graph_key": "g"}})

    copy = tmp_path / "elsewhere" / "copied-root"
    shutil.copytree(root, copy, symlinks=True)
    shutil.rmtree(root)
    moved = CacheStore(copy).entry(factors)
    assert moved.path == copy / entry.key
    assert moved.get_or_compute("g", lambda: pytest.fail("must load, not recompute")) == (digest, data, False)
    assert moved.rank_index(0).read() == {"p": {"digest": digest, "graph_key": "g"}}
    assert moved.get_blob(digest) == data


def test_entry_removed_under_a_writer_is_not_resurrected(entry, caplog):
    shutil.rmtree(entry.path)  # as `kiln cache prune` would, while this process still holds the entry
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        assert entry.get_or_compute("g", lambda: b"data")[1:] == (b"data", True)
    assert not entry.path.exists()
    assert "will not be saved" in caplog.text


# ----- transient read errors, races, wide buffers -----


def fail_reads_of(monkeypatch, module, path, error=errno.EIO):
    """Make `module`'s read_file_nofollow fail with `error` for `path` only (as EIO, EMFILE or
    EACCES would; tests may run as root, where permissions cannot produce EACCES)."""
    real = module.read_file_nofollow

    def read(p):
        if os.fspath(p) == os.fspath(path):
            raise OSError(error, os.strerror(error), os.fspath(p))
        return real(p)

    monkeypatch.setattr(module, "read_file_nofollow", read)


@pytest.mark.parametrize("error", [errno.EIO, errno.EMFILE, errno.EACCES])
def test_unreadable_ref_or_blob_is_a_miss_not_corruption(entry, monkeypatch, caplog, error):
    digest, data, _ = entry.get_or_compute("g", lambda: b"good artifact")
    ref = entry.path / "refs" / "g.json"
    for path in (ref, entry.blob_path(digest)):
        with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="kiln.cache"):
            fail_reads_of(m, kiln.cache.store, path, error)
            assert entry.lookup("g") is None
        assert os.strerror(error) in caplog.text
        assert quarantined(entry) == [] and ref.exists() and entry.blob_path(digest).exists()
    assert entry.lookup("g") == (digest, data)  # readable again: nothing was lost


def test_unreadable_rank_index_kept_and_not_overwritten(entry, monkeypatch, caplog):
    index = entry.rank_index(0)
    d1, d2 = entry.put_blob(b"one"), entry.put_blob(b"two")
    index.update({"p1": {"digest": d1}})
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="kiln.cache"):
        fail_reads_of(m, kiln.cache.rank_index, index.path)
        assert index.read() == {}
        index.update({"p2": {"digest": d2}})  # merging over {} would drop p1: skipped instead
    assert "not updating it" in caplog.text
    assert quarantined(entry) == []
    assert index.read() == {"p1": {"digest": d1}}
    index.update({"p2": {"digest": d2}})
    assert index.read() == {"p1": {"digest": d1}, "p2": {"digest": d2}}


def test_invalidate_with_digest_spares_a_republished_graph(entry):
    old, _, _ = entry.get_or_compute("g", lambda: b"unusable")
    entry.invalidate("g", "another rank found it unusable", digest=old)
    new, _, _ = entry.get_or_compute("g", lambda: b"recompiled")
    # This rank failed to load the old blob too, and invalidates late: the fresh one stays.
    entry.invalidate("g", "stale", digest=old)
    assert entry.lookup("g") == (new, b"recompiled")
    entry.invalidate("g", "this one is bad too", digest=new)
    assert entry.lookup("g") is None and not entry.blob_path(new).exists()
    entry.invalidate("g", "no ref: a no-op", digest=new)
    with pytest.raises(ValueError, match="invalid blob digest"):
        entry.invalidate("g", "x", digest="../../x")


def test_invalidate_with_digest_waits_for_the_compile_lock(entry, monkeypatch):
    old, _, _ = entry.get_or_compute("g", lambda: b"unusable")
    holder = filelock.FileLock(str(entry.path / "locks" / "g.lock"))
    holder.acquire()  # another rank, recompiling
    # Synchronized, not timed: note when invalidate asks for the graph's lock, and whether the
    # holder had released it at each read of the ref.
    asking, released, reads = threading.Event(), threading.Event(), []
    real_make_lock, real_read_ref = entry.make_lock, entry._read_ref

    def make_lock(path, timeout):
        lock = real_make_lock(path, timeout)
        real_acquire = lock.acquire

        def acquire(*args, **kwargs):
            asking.set()
            return real_acquire(*args, **kwargs)

        lock.acquire = acquire
        return lock

    def read_ref(graph_key):
        reads.append(released.is_set())
        return real_read_ref(graph_key)

    monkeypatch.setattr(entry, "make_lock", make_lock)
    monkeypatch.setattr(entry, "_read_ref", read_ref)
    thread = threading.Thread(target=lambda: entry.invalidate("g", "stale", digest=old), daemon=True)
    thread.start()
    try:
        assert asking.wait(30), "invalidate never asked for the graph's compile lock"
        assert reads == [], "invalidate read the ref before it had the lock"
        # The other rank republishes under the lock (as _compute_and_publish does), then releases.
        new = entry.put_blob(b"recompiled")
        atomic_write_json(entry.path / "refs" / "g.json", make_ref(new, len(b"recompiled")))
    finally:
        released.set()
        holder.release()
        thread.join(30)
    assert not thread.is_alive(), "invalidate never finished"
    assert reads == [True], "invalidate must read the ref only once the compile in progress is done"
    monkeypatch.undo()
    assert entry.lookup("g") == (new, b"recompiled")


def test_publish_replaces_a_corrupt_blob_of_the_right_size(entry, caplog):
    digest, data, _ = entry.get_or_compute("g1", lambda: b"shared artifact")
    corrupted = bytearray(data)
    corrupted[0] ^= 0xFF
    entry.blob_path(digest).write_bytes(corrupted)
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        # An identical graph under another key: same bytes, same digest, a fresh ref.
        assert entry.get_or_compute("g2", lambda: b"shared artifact") == (digest, data, True)
    assert entry.blob_path(digest).read_bytes() == data
    assert any(n.startswith(digest + ".") for n in quarantined(entry)) and str(entry.blob_path(digest)) in caplog.text
    assert entry.lookup("g2") == (digest, data)


def test_put_blob_counts_bytes_of_wide_memoryviews(entry):
    wide = memoryview(array.array("i", [1, 2, 3]))  # 3 items, 12 bytes
    digest = entry.put_blob(wide)
    assert digest == digest_bytes(wide.tobytes())
    assert entry.get_blob(digest) == wide.tobytes()
    assert entry.put_blob(wide) == digest  # present with the right size: not written again
    assert (entry.stats.blobs_written, entry.stats.bytes_written) == (1, 12)


def test_rank_index_rejects_paths_and_other_non_json_values(entry):
    index = entry.rank_index(0)
    good = entry.put_blob(b"x")
    with pytest.raises(ValueError, match=r"'p'\.file .*absolute path"):
        index.update({"p": {"digest": good, "file": Path(os.sep, "abs", "blob")}})
    for bad in (Path("relative"), object(), {1: "int key"}, {"nested": [b"bytes"]}):
        with pytest.raises(ValueError, match="'p'.*not plain JSON"):
            index.update({"p": {"digest": good, "extra": bad}})
    assert index.read() == {}
