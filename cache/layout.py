"""Names of things under a cache root, and validation of the names callers hand in.

    <root>/<key>/                    one entry: 32 hex chars, the hash of its key factors
        key_factors.json             the factors, pretty JSON, to explain misses
        last_used                    empty; its mtime is when the entry was last opened
        blobs/<digest>               artifacts, content-addressed (xxh3-128 hex of the bytes)
        refs/<graph_key>.json        {"digest", "size", "created"}: which blob a graph compiled to
        rank_<r>/index.json          {"schema": 1, "entries": {...}}: what rank r loads
        locks/<graph_key>.lock       compile-once locks
        quarantine/                  files that failed verification, kept for inspection
    <root>/.trash-<key>-<pid>-<hex>/ an entry being deleted by prune; never an entry

Every name is relative to the entry, so a root copied or moved elsewhere still loads.
"""

from __future__ import annotations

import re

KEY_FACTORS = "key_factors.json"
LAST_USED = "last_used"
BLOBS = "blobs"
REFS = "refs"
LOCKS = "locks"
QUARANTINE = "quarantine"
RANK_PREFIX = "rank_"
INDEX = "index.json"
TRASH_PREFIX = ".trash-"

INDEX_SCHEMA = 1

_HEX32 = re.compile(r"[0-9a-f]{32}")
_GRAPH_KEY = re.compile(r"[0-9a-zA-Z_.-]{1,128}")
_RANK_DIR = re.compile(r"rank_(0|[1-9][0-9]*)")


def is_key(name: str) -> bool:
    """True for a cache entry directory name (32 lowercase hex chars)."""
    return isinstance(name, str) and _HEX32.fullmatch(name) is not None


def is_digest(name: str) -> bool:
    """True for a blob name (xxh3-128 hex, 32 lowercase hex chars)."""
    return isinstance(name, str) and _HEX32.fullmatch(name) is not None


def check_digest(digest: str) -> str:
    """Return `digest` if it is a valid blob digest, else raise ValueError naming it.

    Validating here is what keeps a digest from a ref file (or a caller) from naming a path
    outside blobs/, such as "../../x".
    """
    if not is_digest(digest):
        raise ValueError(f"invalid blob digest {digest!r}: expected 32 lowercase hex characters")
    return digest


def check_graph_key(graph_key: str) -> str:
    """Return `graph_key` if it matches ^[0-9a-zA-Z_.-]{1,128}$, else raise ValueError naming it."""
    if not isinstance(graph_key, str) or _GRAPH_KEY.fullmatch(graph_key) is None or graph_key in (".", ".."):
        raise ValueError(f"invalid graph_key {graph_key!r}: expected 1-128 characters from [0-9a-zA-Z_.-]")
    return graph_key


def check_rank(rank: int) -> int:
    """Return `rank` if it is a non-negative int, else raise ValueError naming it."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"invalid rank {rank!r}: expected a non-negative int")
    return rank


def rank_dir_name(rank: int) -> str:
    return f"{RANK_PREFIX}{check_rank(rank)}"


def rank_from_dir_name(name: str) -> int | None:
    """The rank of a `rank_<r>` directory name, or None if `name` is not one."""
    match = _RANK_DIR.fullmatch(name)
    return int(match.group(1)) if match else None
