"""CacheStats: counters of one CacheEntry's traffic, for the warm-up report."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CacheStats:
    """Counters of one CacheEntry's traffic, for the warm-up report."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    blobs_written: int = 0
    quarantined: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)
