"""Corruption: damaged blobs, rank indexes and key_factors.json in a warm cache.

Each is detected on the next warm-up, moved to quarantine/ (blobs: and recompiled; metadata:
rebuilt with nothing recompiled), never executed (outputs equal eager ones), and the user sees
exactly one warning naming the damaged file on stderr, with no logging set up by the caller.
"""

from __future__ import annotations

import json

import pytest

from kiln.cache.digest import key_from_factors
from tests.reliability.support import (
    UNIQUE_PIECES,
    index_entries,
    lines_naming,
    run_child,
    verify_clean,
)

pytestmark = pytest.mark.reliability

MAX_ERR = 1e-3


def flip_byte(blob, _other) -> None:
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))


def truncate(blob, _other) -> None:
    with open(blob, "r+b") as f:
        f.truncate(blob.stat().st_size // 2)


def replace_with_valid_artifact(blob, other) -> None:
    # Another piece's artifact: a well-formed tar that would load, run, and give wrong results.
    blob.write_bytes(other.read_bytes())


BLOB_DAMAGE = {"byte flipped": flip_byte, "truncated": truncate, "replaced by another artifact": replace_with_valid_artifact}


# CI runs one kind of damage of each file type; the rest are slow (-m slow).
@pytest.mark.parametrize("damage", [pytest.param(d, marks=() if d == "byte flipped" else pytest.mark.slow)
                                    for d in BLOB_DAMAGE])
def test_damaged_blob_is_quarantined_and_recompiled(cache_copy, tmp_path, figure, damage):
    figure.scenario = f"corruption: blob {damage}"
    root, cold = cache_copy
    key = cold["key"]
    first, *_, last = sorted(index_entries(root, key).values(), key=lambda v: v["graph_key"])
    blob, other = root / key / "blobs" / first["digest"], root / key / "blobs" / last["digest"]
    BLOB_DAMAGE[damage](blob, other)
    figure.fault()

    result = run_child({"root": str(root)}, tmp_path)
    record = result["record"]
    assert record["cache_key"] == key
    assert (record["inductor_compiles"], record["cache_hits"]) == (1, UNIQUE_PIECES - 1)
    assert result["max_err"] < MAX_ERR
    # The blob's own line (the prefetch reads it first), then at most the line of the ref that
    # named it, which the piece's lookup finds pointing at a quarantined blob.
    warnings = lines_naming(result["stderr"], blob.name)
    assert 1 <= len(warnings) <= 2 and str(blob) in warnings[0], result["stderr"]
    assert all("refs" in w for w in warnings[1:]), result["stderr"]
    assert any(p.name.startswith(blob.name + ".") for p in (root / key / "quarantine").iterdir())
    verify_clean(root)
    figure.recovered()


def garbage_index(path) -> None:
    path.write_text('{"schema": 1, "entries": {"piece_0/size_sym": {"digest": "../../etc/passwd"}}}')


def garbage_factors(path) -> None:
    factors = json.loads(path.read_text())
    factors["compiler"]["torch"] = "9.9.9"  # valid JSON that no longer hashes to the key
    path.write_text(json.dumps(factors))


METADATA_DAMAGE = {"rank index": ("rank_0/index.json", garbage_index),
                   "key_factors.json": ("key_factors.json", garbage_factors)}


@pytest.mark.parametrize("target", [pytest.param(t, marks=() if t == "rank index" else pytest.mark.slow)
                                    for t in METADATA_DAMAGE])
def test_damaged_metadata_is_set_aside_and_rebuilt(cache_copy, tmp_path, figure, target):
    figure.scenario = f"corruption: {target}"
    root, cold = cache_copy
    key = cold["key"]
    good_index = index_entries(root, key)
    relative, damage = METADATA_DAMAGE[target]
    path = root / key / relative
    damage(path)
    figure.fault()

    result = run_child({"root": str(root)}, tmp_path)
    record = result["record"]
    assert (record["inductor_compiles"], record["cache_hits"]) == (0, UNIQUE_PIECES)
    assert result["max_err"] < MAX_ERR
    warnings = lines_naming(result["stderr"], relative)
    assert len(warnings) == 1 and str(path) in warnings[0], result["stderr"]
    assert index_entries(root, key) == good_index  # rebuilt as it was
    assert key_from_factors(json.loads((root / key / "key_factors.json").read_text())) == key
    verify_clean(root)
    figure.recovered()
