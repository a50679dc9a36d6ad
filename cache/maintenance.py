"""What `kiln cache ls|prune|explain` do, returning data; the CLI only formats it.

Works on the directory layout directly (no CacheStore), so looking never creates anything.
`verify` lives in cache/verify.py and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kiln.cache.digest import key_from_factors
from kiln.cache.errors import CacheError
from kiln.cache.layout import BLOBS, KEY_FACTORS, LAST_USED, TRASH_PREFIX, is_digest, is_key, rank_from_dir_name
from kiln.cache.permissions import is_real_dir, listdir_or_empty
from kiln.cache.permissions import open_existing_root as open_root
from kiln.cache.permissions import read_file_nofollow
from kiln.cache.verify import VerifyReport, verify

__all__ = [
    "EntryInfo", "PruneReport", "VerifyReport", "MISSING", "delete_entry", "diff_factors", "entry_info",
    "flatten", "format_path", "format_size", "iso_utc", "list_entries", "load_factors", "open_root", "parse_size",
    "prune", "resolve_key", "verify",
]

SECONDS_PER_DAY = 86400.0
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)


@dataclasses.dataclass
class EntryInfo:
    """One entry directory as `kiln cache ls` shows it."""

    key: str
    path: Path
    size: int  # bytes of every file in the entry (blobs, refs, indexes, quarantine)
    blobs: int
    ranks: list[int]
    created: float | None  # mtime of key_factors.json
    last_used: float | None  # mtime of last_used, else created

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "size": self.size,
            "blobs": self.blobs,
            "ranks": self.ranks,
            "created": iso_utc(self.created),
            "last_used": iso_utc(self.last_used),
        }


@dataclasses.dataclass
class PruneReport:
    """What prune removed (or would remove, with dry_run) and why."""

    removed: list[tuple[EntryInfo, str]]
    kept: list[EntryInfo]
    dry_run: bool

    @property
    def removed_bytes(self) -> int:
        return sum(info.size for info, _ in self.removed)

    @property
    def kept_bytes(self) -> int:
        return sum(info.size for info in self.kept)


def list_entries(root: str | os.PathLike | None) -> list[EntryInfo]:
    """Every entry under the root, sorted by key."""
    path = open_root(root)
    return [entry_info(path / name) for name in sorted(os.listdir(path)) if is_key(name) and is_real_dir(path / name)]


def entry_info(entry_dir: Path) -> EntryInfo:
    """Size, blob count, ranks and dates of one entry directory (symlinks not followed)."""
    created = _mtime(entry_dir / KEY_FACTORS)
    last_used = _mtime(entry_dir / LAST_USED) or created
    blobs_dir = entry_dir / BLOBS
    blobs = sum(1 for n in listdir_or_empty(blobs_dir) if is_digest(n)) if is_real_dir(blobs_dir) else 0
    ranks = sorted(r for r in map(rank_from_dir_name, listdir_or_empty(entry_dir)) if r is not None)
    return EntryInfo(entry_dir.name, entry_dir, dir_size(entry_dir), blobs, ranks, created, last_used)


def prune(
    root: str | os.PathLike | None,
    *,
    older_than_days: float | None = None,
    max_size: int | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Delete whole entries: first those last used more than `older_than_days` ago, then the
    least recently used until the total is at most `max_size` bytes."""
    if older_than_days is None and max_size is None:
        raise ValueError("prune needs older_than_days or max_size")
    path = open_root(root)
    now = time.time() if now is None else now
    # Oldest first, so the size pass removes the least recently used.
    kept = sorted(list_entries(path), key=lambda e: (e.last_used or 0.0, e.key))
    removed: list[tuple[EntryInfo, str]] = []
    if older_than_days is not None:
        cutoff = now - older_than_days * SECONDS_PER_DAY
        removed += [(e, f"last used more than {older_than_days:g} days ago") for e in kept if (e.last_used or 0.0) < cutoff]
        kept = [e for e in kept if (e.last_used or 0.0) >= cutoff]
    if max_size is not None:
        while kept and sum(e.size for e in kept) > max_size:
            removed.append((kept.pop(0), f"least recently used while over {max_size} bytes"))
    if not dry_run:
        for info, _ in removed:
            delete_entry(path, info.key)
        _empty_trash(path)
    return PruneReport(removed, sorted(kept, key=lambda e: e.key), dry_run)


def delete_entry(root: Path, key: str) -> None:
    """Remove `<root>/<key>` so that no half-deleted entry is ever seen as an entry: rename it
    to `.trash-<key>-<pid>-<random>` (atomic; no longer a key name) and only then delete the files."""
    # The random part: a trash dir left by a killed prune may carry our pid, and os.replace
    # onto a non-empty directory fails (ENOTEMPTY), which would stop this prune midway.
    trash = root / f"{TRASH_PREFIX}{key}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.replace(root / key, trash)
    except FileNotFoundError:
        return  # another prune got there first
    except OSError as e:
        raise CacheError(f"cannot remove cache entry {root / key}: {e.strerror or e}") from None
    # Errors are ignored: the entry is already gone as far as the cache is concerned, and
    # whatever is left of the trash directory goes at the next prune.
    shutil.rmtree(trash, ignore_errors=True)


def load_factors(root: str | os.PathLike | None, key: str) -> tuple[str, dict, bool]:
    """(full key, factors, verified) of entry `key` (a unique prefix will do).

    verified is False when key_factors.json does not hash to the key (tampered or stale).
    """
    path = open_root(root)
    key = resolve_key(path, key)
    factors_path = path / key / KEY_FACTORS
    try:
        factors = json.loads(read_file_nofollow(factors_path))
    except FileNotFoundError:
        raise CacheError(f"cache entry {key} has no {KEY_FACTORS} ({factors_path})") from None
    except ValueError as e:
        raise CacheError(f"cache file {factors_path} is not valid JSON: {e}") from None
    if not isinstance(factors, dict):
        raise CacheError(f"cache file {factors_path} does not hold a JSON object")
    try:
        verified = key_from_factors(factors) == key
    except CacheError:
        verified = False
    return key, factors, verified


def resolve_key(root: Path, key: str) -> str:
    """`key` itself if it names an entry, else the one entry it is a prefix of; CacheError naming it otherwise."""
    keys = [n for n in listdir_or_empty(root) if is_key(n) and is_real_dir(root / n)]
    if key in keys:
        return key
    matches = [k for k in keys if key and k.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CacheError(f"cache key prefix {key!r} is ambiguous under {root}: {', '.join(sorted(matches))}")
    raise CacheError(f"no cache entry {key!r} under {root}")


def diff_factors(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(path as format_path shows it, value in a, value in b) for every factor that differs;
    MISSING where absent."""
    flat_a, flat_b = flatten(a), flatten(b)
    return [
        (format_path(p), flat_a.get(p, MISSING), flat_b.get(p, MISSING))
        for p in sorted(flat_a.keys() | flat_b.keys())
        if flat_a.get(p, MISSING) != flat_b.get(p, MISSING)
    ]


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


MISSING: Any = _Missing()


def flatten(obj: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dicts as one dict keyed by paths (tuples of keys); lists and scalars are leaves,
    and so is an empty dict. Tuples, not dotted strings: {"a.b": 1} and {"a": {"b": 1}} differ."""
    flat: dict[tuple[str, ...], Any] = {}
    for k, v in obj.items():
        path = (*prefix, k)
        if isinstance(v, dict) and v:
            flat.update(flatten(v, path))
        else:
            flat[path] = v
    return flat


def format_path(path: tuple[str, ...]) -> str:
    """A flatten() path for people: keys joined by ".", a key that holds a "." (or is empty,
    or holds a quote) quoted as JSON, so that ("a.b",) shows as "a.b" and ("a", "b") as a.b."""
    return ".".join(json.dumps(k) if not k or "." in k or '"' in k else k for k in path)


def parse_size(text: str) -> int:
    """Bytes in a size like "500M", "2G", "1.5GiB" or "1048576" (K/M/G/T are powers of 1024)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"invalid size {text!r}: expected bytes or a number with K, M, G or T (e.g. 500M, 2G)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_size(n: int) -> str:
    """Human size: "512 B", "12.3 MiB"."""
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def iso_utc(t: float | None) -> str | None:
    """`2025-01-31T12:00:00Z`, or None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def dir_size(path: Path) -> int:
    """Bytes of all regular files under `path`, not following symlinks."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _empty_trash(root: Path) -> None:
    # Leftovers of a prune that was killed mid-delete. A concurrent prune may be deleting the
    # same files, hence ignore_errors.
    for name in listdir_or_empty(root):
        if name.startswith(TRASH_PREFIX):
            shutil.rmtree(root / name, ignore_errors=True)


def _mtime(path: Path) -> float | None:
    try:
        return os.lstat(path).st_mtime
    except FileNotFoundError:
        return None
