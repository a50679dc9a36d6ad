"""Bundles: cache entries as one portable tar, for images and for copying between clusters.

    manifest.json                       what the bundle holds, with every member's digest
    manifest.sig                        optional: an Ed25519 signature over manifest.json's bytes
    <key>/key_factors.json              per entry, the files a load needs and nothing else
    <key>/blobs/<digest>
    <key>/refs/<graph_key>.json
    <key>/rank_<r>/index.json

The manifest (JSON) is {"kind": "kiln-cache-bundle", "format": 1, "schema": {"index": 1},
"created": "<UTC>", "entries": {"<key>": {"<path in entry>": {"digest", "size"}}}}: digests are
xxh3-128 like the blobs' own names, so an importer checks every member before it stores any.
Locks, quarantine/, last_used and temporary files stay behind. Importing: cache/bundle_import.py.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import stat
import tarfile
import time
from pathlib import Path
from typing import IO, Any

from kiln.cache.atomic import FILE_MODE, atomic_output
from kiln.cache.digest import digest_bytes, digest_file, key_from_factors, new_hasher
from kiln.cache.errors import CacheError
from kiln.cache.layout import (
    BLOBS, INDEX, INDEX_SCHEMA, KEY_FACTORS, REFS, check_graph_key, is_digest, is_key, rank_from_dir_name)
from kiln.cache.permissions import is_real_dir, listdir_or_empty, open_existing_root, read_file_nofollow
from kiln.cache.records import parse_index, parse_ref

KIND = "kiln-cache-bundle"
FORMAT = 1
SCHEMA = {"index": INDEX_SCHEMA}
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"


class BundleError(CacheError):
    """A bundle is malformed, damaged or unsafe, and was refused (nothing was written)."""


def member_kind(rel: str) -> str:
    """What a path inside an entry is ("factors", "blob", "ref", "index"); BundleError for
    anything a bundle may not carry."""
    parts = rel.split("/")
    if parts == [KEY_FACTORS]:
        return "factors"
    if len(parts) == 2 and parts[0] == BLOBS and is_digest(parts[1]):
        return "blob"
    if len(parts) == 2 and parts[0] == REFS and parts[1].endswith(".json"):
        try:
            check_graph_key(parts[1][: -len(".json")])
            return "ref"
        except ValueError:
            pass
    if len(parts) == 2 and parts[1] == INDEX and rank_from_dir_name(parts[0]) is not None:
        return "index"
    raise BundleError(f"{rel!r} is not a file a cache entry holds (key_factors.json, blobs/<digest>, "
                      "refs/<graph key>.json, rank_<r>/index.json)")


@dataclasses.dataclass
class ExportReport:
    """What export wrote."""

    path: Path
    entries: list[str]
    files: int
    bytes: int
    signer: str | None  # fingerprint of the signing key, if signed


@dataclasses.dataclass
class _Member:
    rel: str
    size: int
    digest: str
    data: bytes | None = None  # small records, read once; blobs are streamed from `path`
    path: Path | None = None


def export_bundle(root: str | os.PathLike | None, keys: list[str], output: str | os.PathLike, *,
                  signing_key: str | os.PathLike | None = None) -> ExportReport:
    """Write the entries `keys` (unique prefixes will do; none: every entry) of `root` to the
    tar `output`, atomically; signed with the PEM private key `signing_key` if given.

    Refuses (CacheError) an entry whose files do not verify: run `kiln cache verify` first.
    """
    from kiln.cache.maintenance import resolve_key

    path = open_existing_root(root)
    if keys:
        chosen = list(dict.fromkeys(resolve_key(path, k) for k in keys))
    else:
        chosen = [n for n in sorted(os.listdir(path)) if is_key(n) and is_real_dir(path / n)]
    if not chosen:
        raise CacheError(f"cache root {path} has no entries to export")
    entries = {key: _collect_entry(path / key) for key in chosen}
    manifest_doc = {
        "kind": KIND, "format": FORMAT, "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "entries": {key: {m.rel: {"digest": m.digest, "size": m.size} for m in members}
                    for key, members in entries.items()},
    }
    manifest = (json.dumps(manifest_doc, sort_keys=True, indent=1) + "\n").encode()
    signature = signer = None
    if signing_key is not None:
        from kiln.cache.signing import sign_manifest

        signature = sign_manifest(signing_key, manifest)
        signer = _signer_of(signature)
    output = Path(output)
    _write_tar(output, manifest, signature, entries)
    files = sum(len(m) for m in entries.values())
    return ExportReport(output, chosen, files, sum(m.size for ms in entries.values() for m in ms), signer)


def _collect_entry(entry_dir: Path) -> list[_Member]:
    """The members of one entry, verified: factors that hash to the key, blobs that hash to
    their names, refs and rank indexes that parse and name blobs of this entry."""
    key = entry_dir.name
    raw = _read_record(entry_dir / KEY_FACTORS)
    try:
        factors_key = key_from_factors(json.loads(raw))
    except (ValueError, CacheError) as e:
        raise CacheError(f"cache entry {key}: {KEY_FACTORS} is not valid key factors ({e}); "
                         "run `kiln cache verify`") from None
    if factors_key != key:
        raise CacheError(f"cache entry {key}: {KEY_FACTORS} hashes to {factors_key}; run `kiln cache verify`")
    members = [_Member(KEY_FACTORS, len(raw), digest_bytes(raw), data=raw)]
    blobs: dict[str, _Member] = {}

    def blob(digest: str) -> _Member:
        # Also asked for digests that a ref or an index names: a warm-up may publish beside us.
        if digest not in blobs:
            path = entry_dir / BLOBS / digest
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise CacheError(f"cache entry {key}: blob {digest} is missing; run `kiln cache verify`") from None
            if not stat.S_ISREG(st.st_mode):
                raise CacheError(f"cache entry {key}: blobs/{digest} is not a regular file; run `kiln cache verify`")
            if digest_file(path) != digest:
                raise CacheError(f"cache entry {key}: blob {digest} is corrupt; run `kiln cache verify`")
            blobs[digest] = _Member(f"{BLOBS}/{digest}", st.st_size, digest, path=path)
        return blobs[digest]

    for name in sorted(listdir_or_empty(entry_dir / BLOBS)):
        if is_digest(name):
            blob(name)
    records: list[_Member] = []
    for name in sorted(listdir_or_empty(entry_dir / REFS)):
        rel = f"{REFS}/{name}"
        if not _is_member(rel):
            continue  # a temp file, or not kiln's
        raw = _read_record(entry_dir / rel)
        ref = _parsed(parse_ref, raw, key, rel)
        if blob(ref["digest"]).size != ref["size"]:
            raise CacheError(f"cache entry {key}: {rel} gives a size its blob does not have; run `kiln cache verify`")
        records.append(_Member(rel, len(raw), digest_bytes(raw), data=raw))
    ranks = sorted(r for r in map(rank_from_dir_name, listdir_or_empty(entry_dir)) if r is not None)
    for rank in ranks:
        rel = f"rank_{rank}/{INDEX}"
        if not os.path.lexists(entry_dir / rel):
            continue
        raw = _read_record(entry_dir / rel)
        for value in _parsed(parse_index, raw, key, rel).values():
            blob(value["digest"])
        records.append(_Member(rel, len(raw), digest_bytes(raw), data=raw))
    return members + [blobs[d] for d in sorted(blobs)] + records


def _parsed(parse: Any, raw: bytes, key: str, rel: str) -> Any:
    try:
        return parse(raw)
    except ValueError as e:
        raise CacheError(f"cache entry {key}: {rel} is malformed ({e}); run `kiln cache verify`") from None


def _is_member(rel: str) -> bool:
    try:
        member_kind(rel)
        return True
    except BundleError:
        return False


def _read_record(path: Path) -> bytes:
    try:
        return read_file_nofollow(path)
    except FileNotFoundError:
        raise CacheError(f"cache file {path} is missing; run `kiln cache verify`") from None


def _signer_of(signature: bytes) -> str:
    from kiln.cache.signing import fingerprint  # after sign_manifest, so cryptography is there

    return fingerprint(base64.b64decode(json.loads(signature)["public_key"]))


def _write_tar(output: Path, manifest: bytes, signature: bytes | None, entries: dict[str, list[_Member]]) -> None:
    """The tar at `output`, whole or not at all (a temp file renamed into place)."""
    if output.is_dir():
        raise CacheError(f"output {output} is a directory; name the bundle file (e.g. {output / 'bundle.tar'})")
    try:
        with atomic_output(output) as f:
            # PAX: member names longer than ustar's 100 characters (a key plus a long graph key).
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add(tar, MANIFEST, manifest)
                if signature is not None:
                    _add(tar, SIGNATURE, signature)
                for key, members in entries.items():
                    for m in members:
                        name = f"{key}/{m.rel}"
                        if m.data is not None:
                            _add(tar, name, m.data)
                            continue
                        assert m.path is not None
                        with open(m.path, "rb") as blob:
                            reader = _HashingReader(blob)
                            tar.addfile(_info(name, m.size), reader)
                        if reader.hexdigest() != m.digest:
                            raise CacheError(f"cache entry {key}: blob {m.digest} changed while it was exported")
    except OSError as e:
        raise CacheError(f"cannot write bundle {output}: {e.strerror or e}") from None


def _info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same entries export to the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, FILE_MODE, 0
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


class _HashingReader:
    """A read-only file that hashes what is read through it (tarfile reads exactly `size` bytes)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.hasher = f, new_hasher()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hasher.update(data)
        return data

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()
