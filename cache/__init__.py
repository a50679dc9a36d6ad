"""kiln's on-disk compilation cache: bytes under keys, written atomically, read verified.

Knows nothing about torch or Ray: whoever compiles computes the key factors and hands them in.

    store = CacheStore()                          # $KILN_CACHE_ROOT or ~/.cache/kiln
    entry = store.entry(factors)                  # <root>/<key>/, key = hash of the factors
    digest, data, computed = entry.get_or_compute(graph_key, compile_fn)
    entry.rank_index(rank).update({"piece0/size8": {"digest": digest}})
"""

from kiln.cache.atomic import atomic_write_bytes, atomic_write_json
from kiln.cache.digest import canonical_json, digest_bytes, digest_file, key_from_factors
from kiln.cache.errors import CacheError, UnsafeCacheError
from kiln.cache.permissions import check_root_safe, default_root
from kiln.cache.stats import CacheStats
from kiln.cache.store import CacheEntry, CacheStore, RankIndex

__all__ = [
    "CacheEntry",
    "CacheError",
    "CacheStats",
    "CacheStore",
    "RankIndex",
    "UnsafeCacheError",
    "atomic_write_bytes",
    "atomic_write_json",
    "canonical_json",
    "check_root_safe",
    "default_root",
    "digest_bytes",
    "digest_file",
    "key_from_factors",
]
