"""`kiln cache import`: check a bundle whole, then make its entries visible one atomic step each.

1. Read the tar's member list and refuse, before anything is written: a member with an absolute
   or escaping path (`/x`, `../x`, `a/./b`), a link, a device, a FIFO, a directory, a duplicate
   name, a file the manifest does not list (or a listed one that is missing or of another size),
   a foreign format or schema, and, with `require_signature`, a missing signature, another
   key's, or a manifest changed after signing. Small records (key factors, refs, rank indexes)
   are read and checked now: digests, factors that hash to their key, refs and index entries
   that name blobs of the same entry.
2. Stage every entry under `<root>/.import-<pid>-<hex>/` (private, not an entry name, so no
   loader, `ls`, `verify` or `prune` looks at it), hashing each blob as it is written; one bad
   digest drops the whole staging directory: nothing becomes visible.
3. Place: a new entry is renamed into place whole (atomic); an entry already present gets the
   blobs, refs and rank-index names it lacks, blobs before the refs and indexes that name them,
   each file atomically, so every state a reader can see verifies. An entry that already holds
   everything is skipped.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import shutil
import tarfile
import time
from pathlib import Path
from typing import IO, Iterator

from kiln.cache.bundle import FORMAT, KIND, MANIFEST, SCHEMA, SIGNATURE, BundleError, member_kind
from kiln.cache.digest import digest_bytes, digest_file, key_from_factors, new_hasher
from kiln.cache.errors import CacheError
from kiln.cache.atomic import FILE_MODE, fsync_dir
from kiln.cache.layout import BLOBS, KEY_FACTORS, LAST_USED, REFS, is_digest, is_key, rank_from_dir_name
from kiln.cache.permissions import check_dir_safe, ensure_private_dir, resolve_root
from kiln.cache.records import parse_index, parse_ref
from kiln.cache.store import CacheEntry, CacheStore

STAGING_PREFIX = ".import-"
# A staging directory this old whose process is gone was left by a killed import.
STALE_STAGING_SECONDS = 3600.0
# Records (manifest, factors, refs, indexes) are read whole into memory: bound them.
MAX_RECORD_BYTES = 64 << 20
_CHUNK = 1 << 20


@dataclasses.dataclass
class ImportReport:
    """What an import added, merged and skipped."""

    bundle: Path
    added: list[str] = dataclasses.field(default_factory=list)  # new entries, placed whole
    merged: dict[str, int] = dataclasses.field(default_factory=dict)  # existing entry -> files it gained
    skipped: list[str] = dataclasses.field(default_factory=list)  # present with all the bundle holds
    files: int = 0
    bytes: int = 0
    signature: str = "unsigned"  # or "verified <fingerprint>", or "present, not checked"


@dataclasses.dataclass
class _Plan:
    """A bundle that passed every check that needs no writing."""

    entries: dict[str, dict[str, dict]]  # key -> rel -> {"digest", "size"}
    members: dict[str, tarfile.TarInfo]  # tar name -> its header
    records: dict[str, bytes]  # tar name -> verified bytes, for everything but blobs
    signature: str


def import_bundle(bundle: str | os.PathLike, root: str | os.PathLike | None, *,
                  require_signature: str | os.PathLike | None = None) -> ImportReport:
    """Import the bundle at `bundle` into cache root `root` (created if missing); see the module
    docstring. Raises BundleError (a CacheError) when the bundle is refused, with nothing written."""
    path = Path(bundle)
    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise CacheError(f"bundle {path} does not exist") from None
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"bundle {path} is not a readable tar file: {e}") from None
    with tar:
        plan = _check(tar, require_signature)
        report = ImportReport(path, signature=plan.signature)
        report.files = sum(len(members) for members in plan.entries.values())
        report.bytes = sum(m["size"] for members in plan.entries.values() for m in members.values())
        _stage_and_place(tar, plan, root, report)
    return report


# ----- 1. checks that write nothing -----

def _check(tar: tarfile.TarFile, require_signature: str | os.PathLike | None) -> _Plan:
    try:
        headers = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"the bundle's tar structure is damaged: {e}") from None
    members: dict[str, tarfile.TarInfo] = {}
    for info in headers:
        _check_member(info)
        if info.name in members:
            raise BundleError(f"member {info.name!r} appears twice in the bundle")
        members[info.name] = info
    if MANIFEST not in members:
        raise BundleError(f"the bundle has no {MANIFEST}: not a kiln cache bundle")
    manifest = _read_record(tar, members[MANIFEST])
    entries = _parse_manifest(manifest)
    signature = _check_signature(tar, members, manifest, require_signature)
    listed = {f"{key}/{rel}": m for key, ms in entries.items() for rel, m in ms.items()}
    for name, info in members.items():
        if name in (MANIFEST, SIGNATURE):
            continue
        if name not in listed:
            raise BundleError(f"member {name!r} is not in the bundle's manifest")
        if info.size != listed[name]["size"]:
            raise BundleError(f"member {name!r} has {info.size} bytes; the manifest says {listed[name]['size']}")
    missing = sorted(set(listed) - set(members))
    if missing:
        raise BundleError(f"the manifest lists {len(missing)} files the bundle lacks: {', '.join(missing[:5])}")
    records: dict[str, bytes] = {}
    for key, ms in entries.items():
        for rel, m in ms.items():
            if member_kind(rel) != "blob":
                name = f"{key}/{rel}"
                records[name] = raw = _read_record(tar, members[name])
                if digest_bytes(raw) != m["digest"]:
                    raise BundleError(f"member {name!r} does not match its digest in the manifest: the bundle is damaged")
        _check_entry_records(key, ms, records)
    return _Plan(entries, members, records, signature)


def _check_member(info: tarfile.TarInfo) -> None:
    name = info.name
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise BundleError(f"member {name!r} has an absolute or non-portable path; refusing the bundle")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleError(f"member {name!r} has a path that escapes or is not normalized; refusing the bundle")
    if not info.isreg():
        what = ("a symbolic link" if info.issym() else "a hard link" if info.islnk()
                else "a device" if info.ischr() or info.isblk() else "a FIFO" if info.isfifo()
                else "a directory" if info.isdir() else "not a regular file")
        raise BundleError(f"member {name!r} is {what}; a kiln bundle holds regular files only")
    if name not in (MANIFEST, SIGNATURE):
        key, _, rel = name.partition("/")
        if not is_key(key):
            raise BundleError(f"member {name!r} is not under a cache key (32 hex characters)")
        member_kind(rel)


def _read_record(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    if info.size > MAX_RECORD_BYTES:
        raise BundleError(f"member {info.name!r} is {info.size} bytes, more than a record may be ({MAX_RECORD_BYTES})")
    f = tar.extractfile(info)
    assert f is not None  # a regular file
    try:
        data = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BundleError(f"member {info.name!r} cannot be read: {e}") from None
    if len(data) != info.size:
        raise BundleError(f"member {info.name!r} is truncated")
    return data


def _parse_manifest(raw: bytes) -> dict[str, dict[str, dict]]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"the bundle's {MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise BundleError(f"the bundle's {MANIFEST} is not a kiln cache bundle's (kind {KIND!r})")
    if doc.get("format") != FORMAT:
        raise BundleError(f"the bundle is in format {doc.get('format')!r}; this kiln reads format {FORMAT}")
    if doc.get("schema") != SCHEMA:
        raise BundleError(f"the bundle holds cache schema {doc.get('schema')!r}; this kiln's is {SCHEMA}: "
                          "export it again with a matching kiln")
    entries = doc.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise BundleError(f"the bundle's {MANIFEST} lists no entries")
    for key, members in entries.items():
        if not is_key(key) or not isinstance(members, dict):
            raise BundleError(f"the bundle's {MANIFEST} has a malformed entry {key!r}")
        if KEY_FACTORS not in members:
            raise BundleError(f"entry {key} of the bundle has no {KEY_FACTORS}")
        for rel, m in members.items():
            member_kind(rel)
            size = m.get("size") if isinstance(m, dict) else None
            if not is_digest(m.get("digest") if isinstance(m, dict) else None) or not (
                    isinstance(size, int) and not isinstance(size, bool) and size >= 0):
                raise BundleError(f"the bundle's {MANIFEST} gives {key}/{rel} a malformed digest or size: {m!r}")
    return entries


def _check_signature(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], manifest: bytes,
                     require_signature: str | os.PathLike | None) -> str:
    signed = SIGNATURE in members
    if require_signature is None:
        return "present, not checked" if signed else "unsigned"
    from kiln.cache.signing import check_signature

    doc = _read_record(tar, members[SIGNATURE]) if signed else None
    return f"verified {check_signature(doc, manifest, require_signature)}"


def _check_entry_records(key: str, members: dict[str, dict], records: dict[str, bytes]) -> None:
    """Factors that hash to the key; refs and rank-index entries naming blobs of this entry."""
    blobs = {rel.split("/")[1]: m["size"] for rel, m in members.items() if member_kind(rel) == "blob"}
    try:
        factors_key = key_from_factors(json.loads(records[f"{key}/{KEY_FACTORS}"]))
    except (ValueError, CacheError) as e:
        raise BundleError(f"entry {key}: {KEY_FACTORS} is not valid key factors: {e}") from None
    if factors_key != key:
        raise BundleError(f"entry {key}: {KEY_FACTORS} hashes to {factors_key}, not to its key")
    for rel in members:
        kind, raw = member_kind(rel), records.get(f"{key}/{rel}")
        try:
            if kind == "ref":
                ref = parse_ref(raw)
                if blobs.get(ref["digest"]) != ref["size"]:
                    raise ValueError(f"it names blob {ref['digest']} of {ref['size']} bytes, which the entry lacks")
            elif kind == "index":
                for name, value in parse_index(raw).items():
                    if value["digest"] not in blobs:
                        raise ValueError(f"{name!r} names blob {value['digest']}, which the entry lacks")
        except ValueError as e:
            raise BundleError(f"entry {key}: {rel} is malformed: {e}") from None


# ----- 2. staging, 3. placing -----

def _stage_and_place(tar: tarfile.TarFile, plan: _Plan, root: str | os.PathLike | None, report: ImportReport) -> None:
    root_path = resolve_root(root)
    created_root = not os.path.lexists(root_path)
    store = CacheStore(root_path)
    if store.read_only:
        raise CacheError(f"cache root {store.root} is not writable; cannot import into it")
    _remove_stale_staging(store.root)
    staging = store.root / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    placed = False
    try:
        ensure_private_dir(staging)
        for key, members in plan.entries.items():
            _stage_entry(tar, plan, staging / key, key, members)
        for key in plan.entries:  # refuse an unsafe destination before placing anything
            if os.path.lexists(store.root / key):
                check_dir_safe(store.root / key)
        for key in plan.entries:
            placed = True
            _place_entry(store, staging / key, key, plan, report)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not placed:
            try:
                os.rmdir(store.root)  # a refused import into a new root leaves no trace
            except OSError:
                pass


def _stage_entry(tar: tarfile.TarFile, plan: _Plan, staged: Path, key: str, members: dict[str, dict]) -> None:
    ensure_private_dir(staged)
    for rel in sorted(members):
        name, target = f"{key}/{rel}", staged / rel
        ensure_private_dir(target.parent)
        if name in plan.records:
            _write_new(target, [plan.records[name]])
            continue
        f = tar.extractfile(plan.members[name])
        assert f is not None
        hasher = new_hasher()
        try:
            _write_new(target, _chunks(f, hasher))
        except (tarfile.TarError, EOFError) as e:
            raise BundleError(f"member {name!r} cannot be read: {e}") from None
        if hasher.hexdigest() != members[rel]["digest"]:
            raise BundleError(f"member {name!r} hashes to {hasher.hexdigest()}, not to its digest in the "
                              f"manifest ({members[rel]['digest']}): the bundle is damaged; nothing was imported")


def _chunks(f: IO[bytes], hasher) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        hasher.update(chunk)
        yield chunk


def _write_new(path: Path, chunks: Iterator[bytes] | list[bytes]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        for chunk in chunks:
            view, offset = memoryview(chunk), 0
            while offset < len(view):
                offset += os.write(fd, view[offset:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_entry(store: CacheStore, staged: Path, key: str, plan: _Plan, report: ImportReport) -> None:
    dest = store.root / key
    if not os.path.lexists(dest):
        _write_new(staged / LAST_USED, [])
        fsync_dir(staged)
        try:
            os.rename(staged, dest)  # the whole entry at once
            fsync_dir(store.root)
            report.added.append(key)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # A warm-up created the entry meanwhile: merge into it like into any existing one.
    factors = json.loads(plan.records[f"{key}/{KEY_FACTORS}"])
    entry = store.entry(factors)  # checks its subdirectories, repairs a missing key_factors.json
    assert entry.key == key
    gained = _merge(entry, staged, plan.entries[key], plan.records)
    if gained:
        report.merged[key] = gained
    else:
        report.skipped.append(key)


def _merge(entry: CacheEntry, staged: Path, members: dict[str, dict], records: dict[str, bytes]) -> int:
    """Add what `entry` lacks, in the order that keeps every visible state consistent: blobs,
    then refs (a graph key already published keeps its own compile), then rank-index names."""
    gained = 0
    kinds = {rel: member_kind(rel) for rel in members}
    for rel in sorted(r for r, k in kinds.items() if k == "blob"):
        digest = rel.split("/")[1]
        if not _good_blob(entry.blob_path(digest), digest):
            ensure_private_dir(entry.path / BLOBS)
            os.replace(staged / rel, entry.blob_path(digest))  # over a corrupt copy, if any
            gained += 1
    for rel in sorted(r for r, k in kinds.items() if k == "ref"):
        ensure_private_dir(entry.path / REFS)
        gained += _add_if_absent(staged / rel, entry.path / rel)
    for rel in sorted(r for r, k in kinds.items() if k == "index"):
        index = entry.rank_index(rank_from_dir_name(rel.split("/")[0]))
        current = index.read()
        lacking = {n: v for n, v in parse_index(records[f"{entry.key}/{rel}"]).items() if n not in current}
        if lacking:
            index.update(lacking)
            gained += 1
    fsync_dir(entry.path)
    return gained


def _good_blob(path: Path, digest: str) -> bool:
    try:
        return os.path.isfile(path) and not os.path.islink(path) and digest_file(path) == digest
    except OSError:
        return False


def _add_if_absent(source: Path, target: Path) -> int:
    """Link `source` at `target` unless something is there already (no-clobber, atomic); 1 if added."""
    try:
        os.link(source, target)
    except FileExistsError:
        return 0
    except OSError:  # a filesystem without hard links: a rename, after a look
        if os.path.lexists(target):
            return 0
        os.replace(source, target)
    return 1


def _remove_stale_staging(root: Path) -> None:
    """Staging directories of imports that were killed: old, and their process gone."""
    now = time.time()
    for name in os.listdir(root):
        if not name.startswith(STAGING_PREFIX):
            continue
        pid = name[len(STAGING_PREFIX):].split("-")[0]
        try:
            old = now - os.lstat(root / name).st_mtime > STALE_STAGING_SECONDS
        except FileNotFoundError:
            continue
        if old and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(root / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
