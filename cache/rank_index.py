"""RankIndex: what one rank loads, `<key>/rank_<r>/index.json`, read and merged safely."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.cache.digest import canonical_json
from kiln.cache.errors import CacheError, UnsafeCacheError
from kiln.cache.layout import INDEX, rank_dir_name
from kiln.cache.permissions import read_file_nofollow
from kiln.cache.records import check_index_entry, make_index, parse_index

if TYPE_CHECKING:  # pragma: no cover
    from kiln.cache.store import CacheEntry

logger = logging.getLogger("kiln.cache")


class RankIndex:
    """`<key>/rank_<r>/index.json`: the caller's names (e.g. piece and size) → blob digests.

    Values are dicts holding a "digest" and whatever else the caller records (graph_key,
    bytes, seconds), never absolute paths. Updates merge under a lock and replace the file whole.
    """

    def __init__(self, entry: CacheEntry, rank: int):
        self.entry = entry
        self.rank = rank
        self.path: Path = entry.path / rank_dir_name(rank) / INDEX

    def __repr__(self) -> str:
        return f"RankIndex({str(self.path)!r})"

    def read(self) -> dict[str, dict]:
        """The entries; {} if the index is absent, malformed (then quarantined with a warning)
        or cannot be read now (EACCES, EIO: warned, left in place)."""
        try:
            return self._load()
        except OSError as e:
            logger.warning("cannot read rank index %s (%s); treating it as empty", self.path, e)
            return {}

    def _load(self) -> dict[str, dict]:
        """read(), except that an OSError other than FileNotFoundError is raised: it says
        nothing about the file's bytes, so the file is neither quarantined nor taken as empty."""
        try:
            raw = read_file_nofollow(self.path)
        except FileNotFoundError:
            return {}
        except UnsafeCacheError:
            raise
        except CacheError as e:  # not a regular file
            self._quarantine(f"unreadable rank index: {e}")
            return {}
        try:
            return parse_index(raw)
        except ValueError as e:
            self._quarantine(f"malformed rank index: {e}")
            return {}

    def update(self, entries: dict[str, dict]) -> None:
        """Merge `entries` into the index (same names are replaced) and write it whole, atomically.

        Raises ValueError naming a bad entry (no valid "digest", an absolute path in it, a
        value that is not plain JSON). If the index on disk cannot be read (EACCES, EIO), the
        update is skipped with a warning rather than merged over nothing.
        """
        if not isinstance(entries, dict):
            raise ValueError(f"rank index entries must be a dict, got {type(entries).__name__}")
        for name, value in entries.items():
            check_index_entry(name, value)
        entries = json.loads(canonical_json(entries))  # plain JSON, detached from the caller's
        lock = self.entry.make_lock(self.path.with_name(INDEX + ".lock"), None)
        if lock is None:
            return
        with lock:
            try:
                merged = self._load()
            except OSError as e:
                # Merging over {} would drop every entry already there: skip this update
                # instead, like a failed write (warned, and the job goes on).
                logger.warning("cannot read rank index %s (%s); not updating it", self.path, e)
                return
            merged.update(entries)
            self.entry.write_json(self.path, make_index(merged))

    def _quarantine(self, reason: str) -> None:
        # Named after the rank: every rank's index is called index.json.
        self.entry.quarantine(self.path, reason, name=f"{self.path.parent.name}.{INDEX}")
