"""The small JSON records kept beside blobs: refs and rank indexes. Parsing and validation only.

A ref (`refs/<graph_key>.json`) says which blob a graph compiled to:
    {"digest": "<32 hex>", "size": <bytes>, "created": <unix time>}
A rank index (`rank_<r>/index.json`) maps the caller's names to blobs:
    {"schema": 1, "entries": {"<name>": {"digest": "<32 hex>", ...}}}
Both hold digests only, never paths, so a copied cache still resolves them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from kiln.cache.digest import first_unserializable
from kiln.cache.layout import INDEX_SCHEMA, is_digest


def make_ref(digest: str, size: int) -> dict[str, Any]:
    return {"digest": digest, "size": size, "created": time.time()}


def parse_ref(raw: bytes) -> dict[str, Any]:
    """The ref in `raw`, or ValueError saying what is wrong with it."""
    ref = _parse_json_object(raw)
    if not is_digest(ref.get("digest", "")):
        raise ValueError(f"'digest' is {ref.get('digest')!r}, not 32 lowercase hex characters")
    if not _is_count(ref.get("size")):
        raise ValueError(f"'size' is {ref.get('size')!r}, not a non-negative int")
    created = ref.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ValueError(f"'created' is {created!r}, not a unix time")
    return ref


def parse_index(raw: bytes) -> dict[str, dict]:
    """The entries of the rank index in `raw`, or ValueError saying what is wrong with it."""
    doc = _parse_json_object(raw)
    if doc.get("schema") != INDEX_SCHEMA:
        raise ValueError(f"'schema' is {doc.get('schema')!r}, expected {INDEX_SCHEMA}")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("'entries' is not an object")
    for name, value in entries.items():
        check_index_entry(name, value)
    return entries


def make_index(entries: dict[str, dict]) -> dict[str, Any]:
    return {"schema": INDEX_SCHEMA, "entries": entries}


def check_index_entry(name: Any, value: Any) -> None:
    """ValueError naming `name` unless it is a str and `value` a dict with a valid "digest",
    no absolute paths anywhere in it (absolute paths would break a copied or moved cache), and
    nothing but plain JSON data (str keys; dict, list, str, number, bool, None)."""
    if not isinstance(name, str):
        raise ValueError(f"index entry name {name!r} is not a string")
    if not isinstance(value, dict):
        raise ValueError(f"index entry {name!r} is {type(value).__name__}, not an object")
    if not is_digest(value.get("digest", "")):
        raise ValueError(f"index entry {name!r} has 'digest' {value.get('digest')!r}, not 32 lowercase hex characters")
    where = _first_absolute_path(value, repr(name))
    if where:
        raise ValueError(f"index entry {where} is an absolute path; index entries must be relative")
    # Checked here, not left to json: it would raise TypeError for a Path, and silently turn
    # int keys into strings, so what is read back would differ from what was written.
    where = first_unserializable(value, repr(name))
    if where:
        raise ValueError(f"index entry {where} is not plain JSON data (str keys; dict, list, str, number, bool, None)")


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_absolute_path(value: Any, where: str) -> str:
    """Dotted location of the first string or path object in `value` that is absolute, or ""."""
    if isinstance(value, (str, os.PathLike)):
        return f"{where} ({value!r})" if os.path.isabs(os.fspath(value)) else ""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return ""
    for k, v in items:
        found = _first_absolute_path(v, f"{where}.{k}")
        if found:
            return found
    return ""
