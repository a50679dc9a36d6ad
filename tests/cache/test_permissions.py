"""Safety of the cache root: private creation, refusal of unsafe dirs and links, read-only roots."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

import kiln.cache.atomic
import kiln.cache.permissions
from kiln.cache import CacheStore, UnsafeCacheError, atomic_write_bytes, digest_bytes
from kiln.cache.atomic import TEMP_PREFIX
from kiln.cache.permissions import ensure_private_dir
from tests.reliability.mounts import Mounts

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def mounts():
    """Real tmpfs mounts (skips, naming why, where this machine does not allow mounting)."""
    m = Mounts()
    yield m
    m.unmount_all()


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_root_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = CacheStore(tmp_path / "parent" / "root")
    finally:
        os.umask(old)
    assert mode(store.root) == 0o700
    assert mode(store.entry({"a": 1}).path) == 0o700
    assert not store.read_only


def test_parents_kiln_creates_are_private_and_fsynced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(kiln.cache.permissions, "fsync_dir", lambda d: synced.append(Path(d)))
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o022)
    try:
        ensure_private_dir(tmp_path / "a" / "b" / "root", parents=True)
    finally:
        os.umask(old)
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/root")] == [0o700] * 3
    assert mode(tmp_path) == 0o755  # an existing parent is not ours to change
    # Each new directory's entry is flushed in its parent, top down.
    assert synced == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    with pytest.raises(FileNotFoundError):
        ensure_private_dir(tmp_path / "x" / "y")  # without parents=True nothing is resurrected


def test_existing_private_root_kept(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)  # not writable by group or others: acceptable, and left as it is
    CacheStore(root)
    assert mode(root) == 0o755


@pytest.mark.parametrize("unsafe_mode", [0o770, 0o707, 0o777])
def test_group_or_other_writable_root_refused(tmp_path, unsafe_mode):
    root = tmp_path / "root"
    root.mkdir()
    os.chmod(root, unsafe_mode)
    with pytest.raises(UnsafeCacheError, match=str(root)):
        CacheStore(root)


def test_group_writable_entry_dir_refused(store):
    entry = store.entry({"a": 1})
    os.chmod(entry.path, 0o770)
    with pytest.raises(UnsafeCacheError, match=entry.key):
        store.entry({"a": 1})


def test_symlinked_root_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafeCacheError, match="symlink"):
        CacheStore(link)


@pytest.mark.skipif(not RUNNING_AS_ROOT, reason="making a directory owned by another user needs root (chown)")
def test_root_owned_by_another_user_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(UnsafeCacheError, match=rf"{root}.*uid 65534"):
        CacheStore(root)


def test_symlinked_blob_pointing_outside_refused(entry, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"evil code")
    digest = digest_bytes(b"evil code")
    (entry.path / "blobs").mkdir(mode=0o700)
    entry.blob_path(digest).symlink_to(outside)
    with pytest.raises(UnsafeCacheError, match=digest):
        entry.get_blob(digest)
    with pytest.raises(UnsafeCacheError, match=digest):
        entry.put_blob(b"evil code")
    assert outside.read_bytes() == b"evil code"  # never written through


def test_symlinked_ref_and_subdir_refused(store, entry, tmp_path):
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    entry.get_or_compute("g", lambda: b"data")
    ref = entry.path / "refs" / "g.json"
    ref.rename(outside / "g.json")
    ref.symlink_to(outside / "g.json")
    with pytest.raises(UnsafeCacheError, match="g.json"):
        entry.lookup("g")
    (entry.path / "rank_0").symlink_to(outside)
    with pytest.raises(UnsafeCacheError, match="rank_0"):
        store.entry(entry.factors)


# ----- read-only roots -----


def _fill(root) -> tuple[dict, str, bytes]:
    factors = {"config": "ro"}
    entry = CacheStore(root).entry(factors)
    digest, data, _ = entry.get_or_compute("g", lambda: b"published")
    return factors, digest, data


def _assert_read_only_behaviour(root, factors, digest, data, caplog):
    before = sorted(os.walk(root))
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        store = CacheStore(root)
        assert store.read_only
        entry = store.entry(factors)
        assert entry.get_or_compute("g", lambda: pytest.fail("must load")) == (digest, data, False)
        assert entry.put_blob(b"new") == digest_bytes(b"new")
        assert entry.get_or_compute("other", lambda: b"computed anyway") == (digest_bytes(b"computed anyway"), b"computed anyway", True)
        entry.rank_index(0).update({"p": {"digest": digest}})
        store.entry({"config": "never seen"}).put_blob(b"x")
    warnings = [r for r in caplog.records if "read-only" in r.getMessage()]
    assert len(warnings) == 1, "warn once per store"
    assert str(root) in warnings[0].getMessage() and "will not be saved" in warnings[0].getMessage()
    assert sorted(os.walk(root)) == before, "nothing may be written"


def test_read_only_root_on_a_read_only_filesystem(tmp_path, mounts, caplog):
    """A root on a filesystem mounted read-only: writes fail for root too (EROFS), and
    os.access says so, so the store knows it is read-only before it tries."""
    root = mounts.tmpfs(tmp_path / "mnt", "4m") / "cache-root"
    factors, digest, data = _fill(root)
    assert not CacheStore(root).read_only  # positive control: writable until remounted
    mounts.read_only(root.parent)
    with pytest.raises(OSError) as info:
        (root / "probe").write_bytes(b"x")  # the filesystem, not a mock, refuses
    assert info.value.errno == errno.EROFS
    _assert_read_only_behaviour(root, factors, digest, data, caplog)


@pytest.mark.skipif(RUNNING_AS_ROOT, reason="root may write into a 0o500 directory (the mount test above covers root)")
def test_read_only_root_by_permissions(root, caplog):
    factors, digest, data = _fill(root)
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o500)
    try:
        _assert_read_only_behaviour(root, factors, digest, data, caplog)
    finally:
        for d, _, _ in os.walk(root):
            os.chmod(d, 0o700)


def test_uncreatable_root_is_read_only(tmp_path, mounts, caplog):
    """A root that cannot be created (its parent is on a read-only filesystem)."""
    parent = mounts.tmpfs(tmp_path / "mnt", "1m")
    mounts.read_only(parent)
    store = CacheStore(parent / "cannot-create")
    assert store.read_only
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        entry = store.entry({"a": 1})
        assert entry.get_or_compute("g", lambda: b"v")[1:] == (b"v", True)
    assert not (parent / "cannot-create").exists()
    assert "read-only" in caplog.text


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_failed_writes_warn_once_and_leave_nothing(entry, monkeypatch, caplog, error):
    def half_then_fail(fd, view):
        os.write(fd, view[: len(view) // 2])
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(kiln.cache.atomic, "_write_all", half_then_fail)
    with caplog.at_level(logging.WARNING, logger="kiln.cache"):
        for i in range(3):
            digest, data, computed = entry.get_or_compute(f"g{i}", lambda i=i: b"artifact %d" % i * 100)
            assert digest == digest_bytes(data) and computed
    assert len([r for r in caplog.records if "will not be saved" in r.getMessage()]) == 1, "warn once per entry"
    assert os.strerror(error) in caplog.text
    blobs = entry.path / "blobs"
    assert os.listdir(blobs) == [], "no blob and no temp file may be left"
    assert not (entry.path / "refs").exists() or os.listdir(entry.path / "refs") == []
    monkeypatch.undo()
    assert entry.get_or_compute("g0", lambda: b"later")[1:] == (b"later", True)  # disk freed: works again


def test_atomic_write_cleans_up_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file"
    atomic_write_bytes(target, b"old contents")

    def fail(fd, view):
        os.write(fd, view[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kiln.cache.atomic, "_write_all", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new contents that do not fit")
    assert target.read_bytes() == b"old contents"
    assert [n for n in os.listdir(tmp_path) if n.startswith(TEMP_PREFIX)] == []
