"""`kiln cache verify`: recheck everything under a root and quarantine what is bad.

Checks, per entry: key_factors.json hashes to the directory's key; every blob's bytes hash to
its name; every ref parses and names an existing blob of the right size; every rank index
parses and names existing blobs. Bad files go to the entry's quarantine/; a rank index with
some bad entries is kept with its good ones (the original goes to quarantine/). Temporary
files of killed writers are removed once stale; younger ones may belong to a live writer.

Verify may run beside a warm-up or a prune: a file that vanishes mid-run was moved by them and
is skipped. A file that cannot be read (EACCES, EIO) is reported as a problem, never
quarantined: nothing says its bytes are bad.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import filelock

from kiln.cache.atomic import FILE_MODE, atomic_write_bytes, atomic_write_json, is_temp_name
from kiln.cache.digest import digest_file, key_from_factors
from kiln.cache.errors import CacheError, UnsafeCacheError
from kiln.cache.layout import BLOBS, INDEX, KEY_FACTORS, LOCKS, QUARANTINE, REFS, is_digest, is_key, rank_from_dir_name
from kiln.cache.permissions import (check_dir_safe, ensure_private_dir, listdir_or_empty, open_existing_root,
                                    read_file_nofollow)
from kiln.cache.quarantine import quarantine_file, quarantine_name
from kiln.cache.records import make_index, parse_index, parse_ref

# A temp file untouched this long belongs to a writer that died: a live one writes every chunk.
STALE_TEMP_SECONDS = 3600.0


@dataclasses.dataclass
class VerifyReport:
    """What verify checked and what it had to do."""

    entries: int = 0
    blobs: int = 0
    refs: int = 0
    indexes: int = 0
    bytes_checked: int = 0
    quarantined: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path under root, why)
    problems: list[str] = dataclasses.field(default_factory=list)  # found but not fixable here
    temp_removed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.quarantined and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


def verify(root: str | os.PathLike | None, *, stale_temp_seconds: float = STALE_TEMP_SECONDS) -> VerifyReport:
    """Verify every entry under `root` (which must exist and be safe); see the module docstring."""
    path = open_existing_root(root)
    report = VerifyReport()
    for name in sorted(os.listdir(path)):
        if is_key(name):
            _EntryVerifier(path, path / name, report, time.time() - stale_temp_seconds).run()
    return report


class _EntryVerifier:
    """Verifies one entry directory into a shared VerifyReport."""

    def __init__(self, root: Path, entry_dir: Path, report: VerifyReport, stale_before: float):
        self.root = root
        self.dir = entry_dir
        self.report = report
        self.stale_before = stale_before
        self.blob_sizes: dict[str, int] = {}  # digest -> size, of blobs that verified
        self.bad_blobs: set[str] = set()  # digests of blobs found bad
        self.unreadable: set[str] = set()  # digests of blobs we could not read: neither good nor bad
        self.blobs_usable = False  # blobs/ is a real directory (not a symlink) we may read

    def run(self) -> None:
        try:
            check_dir_safe(self.dir)
        except FileNotFoundError:
            return  # pruned since the root was listed
        except CacheError as e:
            self.report.problems.append(str(e))
            return
        except OSError as e:
            self._unreadable(self.dir, e)
            return
        self.report.entries += 1
        self._check_key_factors()
        subdirs = [BLOBS, REFS, LOCKS, QUARANTINE] + [n for n in listdir_or_empty(self.dir) if rank_from_dir_name(n) is not None]
        real = {name for name in subdirs if self._is_real_subdir(self.dir / name)}
        self._remove_stale_temps(self.dir)
        if QUARANTINE in real:  # verify itself writes there (_drop_index_entries), atomically
            self._remove_stale_temps(self.dir / QUARANTINE)
        self.blobs_usable = BLOBS in real
        if self.blobs_usable:
            self._check_blobs(self.dir / BLOBS)
        if REFS in real:
            self._check_refs(self.dir / REFS)
        for name in sorted(real):
            if rank_from_dir_name(name) is not None:
                self._check_rank_index(self.dir / name / INDEX)

    def _bad(self, path: Path, reason: str, *, name: str | None = None) -> None:
        if quarantine_file(self.dir, path, reason, name=name) is not None:
            self.report.quarantined.append((self._rel(path), reason))
        elif os.path.lexists(path):
            self.report.problems.append(f"{self._rel(path)}: {reason}; could not quarantine it")

    def _unreadable(self, path: Path, error: OSError) -> None:
        # Not quarantined: a transient error (EIO, EMFILE) or a permission says nothing of the bytes.
        self.report.problems.append(f"{self._rel(path)}: cannot read it: {error.strerror or error}")

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def _is_real_subdir(self, path: Path) -> bool:
        """True for a real directory; a symlink or file in its place is quarantined."""
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                check_dir_safe(path)  # loaders refuse it (other owner, group-writable): say so
        except FileNotFoundError:
            return False  # gone meanwhile (prune renamed the entry, say)
        except CacheError as e:
            self.report.problems.append(str(e))
            return True
        except OSError as e:
            self._unreadable(path, e)
            return False
        if stat.S_ISDIR(st.st_mode):
            return True
        self._bad(path, "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a directory")
        return False

    def _check_key_factors(self) -> None:
        path = self.dir / KEY_FACTORS
        try:
            raw = read_file_nofollow(path)
        except FileNotFoundError:
            self.report.problems.append(f"{self._rel(path)} is missing: the entry cannot be explained")
            return
        except CacheError as e:
            self._bad(path, str(e))
            return
        except OSError as e:
            self._unreadable(path, e)
            return
        try:
            key = key_from_factors(json.loads(raw))
        except (ValueError, CacheError) as e:
            self._bad(path, f"not valid key factors: {e}")
            return
        if key != self.dir.name:
            self._bad(path, f"its factors hash to {key}, not to the directory's key")

    def _check_blobs(self, blobs_dir: Path) -> None:
        self._remove_stale_temps(blobs_dir)
        for name in sorted(listdir_or_empty(blobs_dir)):
            if is_digest(name):  # else a temp file (handled above) or not ours: leave it
                self._blob_size(name)

    def _blob_size(self, digest: str) -> int | None:
        """Size of blob `digest` if it verifies, else None (quarantined if present but bad).

        Also called for digests that refs and indexes name, so a blob published after the scan
        of blobs/ (verify can run beside a warm-up) is verified rather than taken for missing.
        """
        known = digest in self.blob_sizes or digest in self.bad_blobs or digest in self.unreadable
        if known or not self.blobs_usable:
            return self.blob_sizes.get(digest)
        path = self.dir / BLOBS / digest
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                actual = digest_file(path)
        except FileNotFoundError:
            return None  # absent, or quarantined by a concurrent reader meanwhile
        except OSError as e:
            self.unreadable.add(digest)
            self._unreadable(path, e)
            return None
        self.report.blobs += 1
        if not stat.S_ISREG(st.st_mode):
            self.bad_blobs.add(digest)
            self._bad(path, "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a regular file")
            return None
        self.report.bytes_checked += st.st_size
        if actual != digest:
            self.bad_blobs.add(digest)
            self._bad(path, f"its content hashes to {actual}, not to its name")
            return None
        self.blob_sizes[digest] = st.st_size
        return st.st_size

    def _check_refs(self, refs_dir: Path) -> None:
        self._remove_stale_temps(refs_dir)
        for name in sorted(listdir_or_empty(refs_dir)):
            if not name.endswith(".json") or is_temp_name(name):
                continue
            path = refs_dir / name
            self.report.refs += 1
            try:
                ref = parse_ref(read_file_nofollow(path))
            except FileNotFoundError:
                continue
            except (ValueError, CacheError) as e:
                self._bad(path, f"malformed ref: {e}")
                continue
            except OSError as e:
                self._unreadable(path, e)
                continue
            size = self._blob_size(ref["digest"])
            if ref["digest"] in self.unreadable:
                continue  # the blob may be fine: its problem is reported, the ref is left alone
            if size is None:
                self._bad(path, f"its blob {ref['digest']} is missing or corrupt")
            elif size != ref["size"]:
                self._bad(path, f"it says {ref['size']} bytes, blob has {size}")

    def _check_rank_index(self, path: Path) -> None:
        self._remove_stale_temps(path.parent)
        if not os.path.lexists(path):
            return
        self.report.indexes += 1
        # Every rank's index is called index.json: its quarantined copy is named after the rank.
        name = f"{path.parent.name}.{INDEX}"
        try:
            entries = parse_index(read_file_nofollow(path))
        except FileNotFoundError:
            return
        except UnsafeCacheError as e:
            self._bad(path, str(e), name=name)
            return
        except (ValueError, CacheError) as e:
            self._bad(path, f"malformed rank index: {e}", name=name)
            return
        except OSError as e:
            self._unreadable(path, e)
            return
        if self._dangling(entries):
            self._drop_index_entries(path, name)

    def _dangling(self, entries: dict[str, dict]) -> list[str]:
        """Names of the index entries whose blob is missing or bad (not merely unreadable)."""
        return sorted(
            n for n, v in entries.items() if self._blob_size(v["digest"]) is None and v["digest"] not in self.unreadable
        )

    def _drop_index_entries(self, path: Path, name: str) -> None:
        """Keep the index's good entries: save the original to quarantine/ and rewrite it
        without the entries whose blobs are gone, under the index lock (writers merge there).

        What is dangling is decided again under the lock: a writer may have merged, or
        republished a blob, since the first look; if nothing dangles any more, nothing is done.
        """
        reason = "entries name missing or corrupt blobs"
        try:
            # filelock makes a missing parent: never resurrect a rank dir that prune just removed.
            check_dir_safe(path.parent)
            with filelock.FileLock(str(path.with_name(INDEX + ".lock")), mode=FILE_MODE):
                raw = read_file_nofollow(path)
                entries = parse_index(raw)
                dangling = self._dangling(entries)
                if not dangling:
                    return
                reason = f"{len(dangling)} entries name missing or corrupt blobs ({', '.join(dangling[:5])})"
                good = {n: v for n, v in entries.items() if n not in dangling}
                ensure_private_dir(self.dir / QUARANTINE)
                atomic_write_bytes(self.dir / QUARANTINE / quarantine_name(name), raw)
                atomic_write_json(path, make_index(good))
        except FileNotFoundError:
            return  # the index (or the whole entry) went away meanwhile: nothing left to fix
        except (ValueError, CacheError, OSError) as e:
            self.report.problems.append(f"{self._rel(path)}: {reason}; could not rewrite it: {e}")
            return
        self.report.quarantined.append((self._rel(path), reason))

    def _remove_stale_temps(self, directory: Path) -> None:
        for name in listdir_or_empty(directory):
            if not is_temp_name(name):
                continue
            path = directory / name
            try:
                if os.lstat(path).st_mtime < self.stale_before:
                    os.unlink(path)
                    self.report.temp_removed.append(self._rel(path))
            except FileNotFoundError:
                pass  # its writer finished (renamed it) or gave up meanwhile
            except OSError as e:
                self.report.problems.append(f"{self._rel(path)}: stale temporary file; could not remove it: {e}")
