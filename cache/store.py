"""The cache store: one directory per key, content-addressed blobs, refs, and per-rank indexes.

CacheStore opens (and if needed creates) a root; CacheStore.entry(factors) opens the directory
of one key; CacheEntry stores and verifies blobs and publishes compiled graphs exactly once
across processes; RankIndex is the per-rank map from the caller's names to blob digests.
Layout and file formats: cache/layout.py and cache/records.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Callable

import filelock

from kiln.cache.atomic import FILE_MODE, atomic_write_bytes, atomic_write_json
from kiln.cache.digest import canonical_json, digest_bytes, digest_file, key_from_factors
from kiln.cache.errors import CacheError, UnsafeCacheError
from kiln.cache.layout import (
    BLOBS,
    KEY_FACTORS,
    LAST_USED,
    LOCKS,
    QUARANTINE,
    REFS,
    check_digest,
    check_graph_key,
    is_key,
    rank_from_dir_name,
)
from kiln.cache.permissions import (
    check_dir_safe,
    check_root_safe,
    ensure_private_dir,
    is_not_writable_error,
    is_real_dir,
    is_writable,
    read_file_nofollow,
    resolve_root,
)
from kiln.cache.quarantine import quarantine_file
from kiln.cache.rank_index import RankIndex
from kiln.cache.stats import CacheStats
from kiln.cache.records import make_ref, parse_ref

logger = logging.getLogger("kiln.cache")


class CacheStore:
    """A cache root: $KILN_CACHE_ROOT or ~/.cache/kiln unless `root` is given.

    The root is created 0o700 if missing and refused (UnsafeCacheError) if it is a symlink,
    another user's, or group/other-writable. A root we cannot write to is opened read-only:
    reads work, writes are skipped with one warning per store.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root: Path = resolve_root(root).absolute()
        self.read_only: bool = False
        self._read_only_warned = False
        if os.path.lexists(self.root):
            check_root_safe(self.root)
            self.read_only = not is_writable(self.root)
        else:
            try:
                ensure_private_dir(self.root, parents=True)
            except OSError as e:
                if not is_not_writable_error(e):
                    raise
                # No cache beats no job: run without saving, and say so at the first write.
                self.read_only = True

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r}, read_only={self.read_only})"

    def entry(self, factors: dict) -> CacheEntry:
        """Open (creating if needed) the entry for `factors`; see CacheEntry."""
        key = key_from_factors(factors)
        path = self.root / key
        if not self.read_only:
            try:
                ensure_private_dir(path)
            except OSError as e:
                # Not writable although os.access said yes (root on a read-only mount, say), or
                # the root was deleted under us: carry on without saving rather than fail the job.
                if not (is_not_writable_error(e) or isinstance(e, FileNotFoundError)):
                    raise
                self.read_only = True
        if os.path.lexists(path):
            check_dir_safe(path)
        # Keep a plain-JSON copy: what key_factors.json will hold, and safe from caller mutation.
        entry = CacheEntry(self, key, json.loads(canonical_json(factors)))
        entry._open()
        return entry

    def keys(self) -> list[str]:
        """Keys of the entry directories under the root, sorted (temp/trash dirs excluded)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_key(n) and is_real_dir(self.root / n))

    def warn_read_only(self) -> None:
        """Log, once per store, that writes are being skipped."""
        if not self._read_only_warned:
            self._read_only_warned = True
            logger.warning("cache root %s is read-only: compiled artifacts will not be saved", self.root)


class CacheEntry:
    """The directory `<root>/<key>` of one set of key factors. Get it from CacheStore.entry()."""

    def __init__(self, store: CacheStore, key: str, factors: dict):
        self.store = store
        self.key = key
        self.path: Path = store.root / key
        self.factors = factors
        self.stats = CacheStats()
        self._write_warned = False

    def __repr__(self) -> str:
        return f"CacheEntry({self.key!r}, path={str(self.path)!r})"

    # ----- blobs -----

    def blob_path(self, digest: str) -> Path:
        """Where the blob named `digest` lives (whether or not it exists)."""
        return self.path / BLOBS / check_digest(digest)

    def put_blob(self, data: bytes) -> str:
        """Store `data` under its digest (atomically, if not already there); return the digest.

        A failed write (read-only root, disk full, ...) leaves nothing behind, warns once per
        entry, and still returns the digest: the caller has the bytes and can go on.
        """
        digest, _ = self._put_blob(data)
        return digest

    def get_blob(self, digest: str) -> bytes | None:
        """The verified bytes of blob `digest`, or None if absent or corrupt (then quarantined).

        Raises UnsafeCacheError if the blob path is a symlink: it is never followed.
        """
        path = self.blob_path(digest)
        try:
            data = read_file_nofollow(path)
        except FileNotFoundError:
            return None
        except UnsafeCacheError:
            raise
        except CacheError as e:  # not a regular file
            self.quarantine(path, str(e))
            return None
        except OSError as e:
            logger.warning("cannot read cache blob %s (%s); treating it as missing", path, e)
            return None
        self.stats.bytes_read += len(data)
        actual = digest_bytes(data)
        if actual != digest:
            self.quarantine(path, f"its content hashes to {actual}, not to its name")
            return None
        return data

    # ----- compiled graphs -----

    def lookup(self, graph_key: str) -> tuple[str, bytes] | None:
        """(digest, data) published for `graph_key`, verified; None (a miss) otherwise.

        A malformed ref, or one whose blob is missing or corrupt, is quarantined.
        """
        found = self._lookup(check_graph_key(graph_key))
        if found is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return found

    def get_or_compute(
        self, graph_key: str, compute: Callable[[], bytes], *, timeout: float | None = None,
        preread: Callable[[str], bytes | None] | None = None,
    ) -> tuple[str, bytes, bool]:
        """(digest, data, computed): the published bytes for `graph_key`, or compute and publish them.

        Across processes sharing the root, compute() runs once per graph_key: the first caller
        takes `locks/<graph_key>.lock` and computes, the rest wait on the lock and then load.
        If compute() raises, nothing is written and the error propagates. `timeout` (seconds,
        None = wait forever) bounds the wait; on expiry TimeoutError (filelock.Timeout) names
        the lock file. A lock held by a process that died is released by the OS.

        `preread(digest)`: bytes of that blob already read through get_blob() (so verified), or
        None; lets a caller read many blobs at once (in parallel) and not read them twice. The
        ref is read from disk either way, and its size checked against the bytes.
        """
        check_graph_key(graph_key)
        found = self._lookup(graph_key, preread)
        if found is not None:
            self.stats.hits += 1
            return (*found, False)
        lock = self.make_lock(self._lock_path(graph_key), timeout)
        if lock is None:  # read-only: nobody can publish, so there is nothing to wait for
            return self._compute_and_publish(graph_key, compute)
        with lock:
            # Whoever held the lock before us may have published while we waited.
            found = self._lookup(graph_key)
            if found is not None:
                self.stats.hits += 1
                return (*found, False)
            return self._compute_and_publish(graph_key, compute)

    def invalidate(self, graph_key: str, reason: str, digest: str | None = None) -> None:
        """Quarantine the ref of `graph_key` and its blob: for a verified blob that turned out
        unusable (e.g. it fails to deserialize). The next get_or_compute recomputes.

        With `digest` (the blob the caller found unusable): only under the graph's compile-once
        lock, and only if the ref still names that digest, for another rank may have invalidated
        it and published a fresh compile meanwhile. Never call it while holding that lock.
        """
        check_graph_key(graph_key)
        lock = None
        if digest is not None:
            check_digest(digest)
            # None when read-only: then nobody can republish, nor can anything be moved.
            lock = self.make_lock(self._lock_path(graph_key), None)
        with lock or contextlib.nullcontext():
            ref = self._read_ref(graph_key)
            if ref is None or (digest is not None and ref["digest"] != digest):
                return
            logger.warning("cache entry %s: invalidating graph %s: %s", self.key, graph_key, reason)
            self.quarantine(self._ref_path(graph_key), f"invalidated: {reason}")
            if os.path.lexists(self.blob_path(ref["digest"])):
                self.quarantine(self.blob_path(ref["digest"]), f"invalidated: {reason}")

    def rank_index(self, rank: int) -> RankIndex:
        """The index of what rank `rank` loads: `<key>/rank_<rank>/index.json`."""
        return RankIndex(self, rank)

    # ----- helpers shared with RankIndex -----

    def write_json(self, path: Path, obj: dict) -> None:
        """Atomically write `obj` to `path` (its directory made private first), or warn."""
        if self.store.read_only:
            self.store.warn_read_only()
            return
        try:
            ensure_private_dir(path.parent)
            atomic_write_json(path, obj)
        except OSError as e:
            self._write_failed(path, e)

    def make_lock(self, path: Path, timeout: float | None) -> filelock.FileLock | None:
        """A FileLock at `path`, or None when the cache is read-only and no lock file can be made."""
        if self.store.read_only:
            self.store.warn_read_only()
            return None
        try:
            ensure_private_dir(path.parent)
        except OSError as e:
            self._write_failed(path, e)
            return None
        return filelock.FileLock(str(path), timeout=-1 if timeout is None else timeout, mode=FILE_MODE)

    def quarantine(self, path: Path, reason: str, *, name: str | None = None, follow_up: bool = False) -> None:
        """Move a bad file under this entry to quarantine/ (logged), counting it in stats.

        follow_up=True: the file is bad only because of another one that was just quarantined
        (and warned about); this move is logged at INFO so the user sees one warning.
        """
        level = logging.INFO if follow_up else logging.WARNING
        if quarantine_file(self.path, path, reason, name=name, level=level) is not None:
            self.stats.quarantined += 1

    def has_blob(self, digest: str) -> bool:
        """Whether blob `digest` is on disk as a regular file (not verified: get_blob does that)."""
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(digest)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    # ----- internals -----

    def _open(self) -> None:
        """Refuse symlinked subdirectories, make key_factors.json right, and touch last_used."""
        for name in (BLOBS, REFS, LOCKS, QUARANTINE):
            if os.path.lexists(self.path / name):
                check_dir_safe(self.path / name)
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if rank_from_dir_name(name) is not None:
                    check_dir_safe(self.path / name)
        self._sync_key_factors()
        self._touch_last_used()

    def _sync_key_factors(self) -> None:
        path = self.path / KEY_FACTORS
        try:
            raw = read_file_nofollow(path)
        except FileNotFoundError:
            problem = None
        except UnsafeCacheError:
            raise
        except (CacheError, OSError) as e:
            problem = f"unreadable: {e}"
        else:
            try:
                stored_key = key_from_factors(json.loads(raw))
            except (ValueError, CacheError) as e:
                problem = f"not valid key factors: {e}"
            else:
                if stored_key == self.key:
                    return
                problem = f"its factors hash to {stored_key}, not to the directory's key {self.key}"
        if self.store.read_only:
            if problem:
                logger.warning("cache file %s is bad (%s); read-only cache, leaving it", path, problem)
            else:
                self.store.warn_read_only()
            return
        if problem:
            self.quarantine(path, problem)
        try:
            atomic_write_json(path, self.factors)
        except OSError as e:
            self._write_failed(path, e)

    def _touch_last_used(self) -> None:
        # Only prune reads this, so failing to update it (read-only root) is not worth a warning.
        if self.store.read_only:
            return
        try:
            fd = os.open(self.path / LAST_USED, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _put_blob(self, data: bytes) -> tuple[str, bool]:
        """(digest, stored): stored is False if the write was skipped or failed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"cache blobs are bytes, got {type(data).__name__}")
        # As bytes: len() of a memoryview of wider items (array('i'), say) counts items.
        data = memoryview(data).cast("B")
        digest = digest_bytes(data)
        path = self.blob_path(digest)
        if self._blob_present(path, data.nbytes, digest):
            return digest, True
        if self.store.read_only:
            self.store.warn_read_only()
            return digest, False
        try:
            ensure_private_dir(path.parent)
            atomic_write_bytes(path, data)
        except OSError as e:
            self._write_failed(path, e)
            return digest, False
        self.stats.bytes_written += data.nbytes
        self.stats.blobs_written += 1
        return digest, True

    def _blob_present(self, path: Path, size: int, digest: str) -> bool:
        """Whether a good copy of blob `digest` (`size` bytes) is already at `path`. Its bytes
        are checked, not just its size, since a ref is about to name it: a bad one is quarantined,
        an unreadable one rewritten (atomically, so never worse than before)."""
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeCacheError(f"cache file {path} is a symlink; refusing to follow it")
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
            actual = digest_file(path)
        except OSError:  # absent, or unreadable for now
            return False
        if actual != digest:
            self.quarantine(path, f"its content hashes to {actual}, not to its name")
            return False
        return True

    def _ref_path(self, graph_key: str) -> Path:
        return self.path / REFS / f"{graph_key}.json"

    def _lock_path(self, graph_key: str) -> Path:
        return self.path / LOCKS / f"{graph_key}.lock"

    def _read_ref(self, graph_key: str) -> dict | None:
        """The parsed ref of `graph_key`; None if absent, unreadable (warned) or malformed (quarantined)."""
        path = self._ref_path(graph_key)
        try:
            return parse_ref(read_file_nofollow(path))
        except FileNotFoundError:
            return None
        except UnsafeCacheError:
            raise
        except (ValueError, CacheError) as e:  # CacheError: not a regular file
            self.quarantine(path, f"malformed ref: {e}")
            return None
        except OSError as e:
            # EACCES, EMFILE, EIO say nothing about the file's bytes: a miss, not corruption.
            logger.warning("cannot read cache ref %s (%s); treating it as a miss", path, e)
            return None

    def _lookup(self, graph_key: str, preread: Callable[[str], bytes | None] | None = None
                ) -> tuple[str, bytes] | None:
        """lookup() without counting hits and misses."""
        ref = self._read_ref(graph_key)
        if ref is None:
            return None
        quarantined_before = self.stats.quarantined
        data = preread(ref["digest"]) if preread is not None else None
        if data is None:
            data = self.get_blob(ref["digest"])
        if data is None:
            # A corrupt blob was just quarantined with a warning; a missing one was not. A blob
            # still there could not be read (EIO, EMFILE): the ref may be fine, so it stays.
            just_quarantined = self.stats.quarantined > quarantined_before
            if just_quarantined or not os.path.lexists(self.blob_path(ref["digest"])):
                self.quarantine(self._ref_path(graph_key), f"its blob {ref['digest']} is missing or corrupt",
                                follow_up=just_quarantined)
            return None
        if len(data) != ref["size"]:
            self.quarantine(self._ref_path(graph_key), f"it says {ref['size']} bytes, blob has {len(data)}")
            return None
        return ref["digest"], data

    def _compute_and_publish(self, graph_key: str, compute: Callable[[], bytes]) -> tuple[str, bytes, bool]:
        self.stats.misses += 1
        data = compute()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"compute() for graph_key {graph_key!r} returned {type(data).__name__}, expected bytes")
        data = bytes(data)
        digest, stored = self._put_blob(data)
        # The blob is in place before the ref names it, so a visible ref always has its blob.
        if stored:
            self.write_json(self._ref_path(graph_key), make_ref(digest, len(data)))
        return digest, data, True

    def _write_failed(self, path: Path, error: OSError) -> None:
        if not self._write_warned:
            self._write_warned = True
            logger.warning(
                "cannot write cache file %s (%s): compiled artifacts of cache entry %s will not be saved",
                path,
                error.strerror or error,
                self.key,
            )
