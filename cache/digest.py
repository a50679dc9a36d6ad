"""Content digests and cache keys: xxh3-128 hex of bytes, and of canonical JSON for key factors."""

from __future__ import annotations

import json
import os
from typing import Any

import xxhash

from kiln.cache.errors import CacheError

# Bytes read per step when hashing a file, so verifying a multi-GiB blob needs little memory.
_FILE_CHUNK = 1 << 20


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """xxh3-128 of `data` as 32 lowercase hex characters: the name a blob is stored under."""
    return xxhash.xxh3_128_hexdigest(data)


def new_hasher() -> xxhash.xxh3_128:
    """An incremental xxh3-128 hasher: update() it with chunks; hexdigest() is digest_bytes of them all."""
    return xxhash.xxh3_128()


def digest_file(path: str | os.PathLike) -> str:
    """xxh3-128 hex of a file's contents, read in chunks."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_FILE_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def canonical_json(obj: Any) -> str:
    """kiln's one JSON spelling of `obj`, which every key and hash is computed from: sorted keys,
    no whitespace, ASCII, no NaN, so a hash depends neither on dict order, PYTHONHASHSEED nor
    the platform."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def digest_text(text: str) -> str:
    """xxh3-128 hex of `text` as UTF-8 (the digest of canonical JSON, for instance)."""
    return digest_bytes(text.encode("utf-8"))


def key_from_factors(factors: dict) -> str:
    """The cache key (32 hex chars) of a dict of key factors: xxh3-128 of their canonical JSON.

    Raises CacheError naming the offending field if the factors are not plain JSON data.
    """
    if not isinstance(factors, dict):
        raise CacheError(f"key factors must be a dict, got {type(factors).__name__}")
    # Checked up front rather than left to json: json silently turns int keys into strings, so
    # {1: x} and {"1": x} would share a key while key_factors.json could not tell them apart.
    bad = first_unserializable(factors, "factors")
    if bad:
        raise CacheError(f"key factors must be plain JSON data (str keys; dict, list, str, number, bool, None): {bad}")
    return digest_bytes(canonical_json(factors).encode("utf-8"))


def first_unserializable(obj: Any, path: str) -> str:
    """Dotted path of the first value that is not plain JSON data, or "" if there is none."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{path} (key {k!r} is not a string)"
            found = first_unserializable(v, f"{path}.{k}")
            if found:
                return found
        return ""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = first_unserializable(v, f"{path}[{i}]")
            if found:
                return found
        return ""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return ""
    return f"{path} ({type(obj).__name__})"
