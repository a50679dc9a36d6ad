"""A rank's artifacts read off disk in parallel, before its pieces ask for them one by one.

A warm start loads one artifact per piece and size. Reading a blob, checking its digest and
unpacking its files into a private directory need neither Inductor nor the GIL for long (file
I/O, hashing), so they run in a thread pool as soon as the cache entry is known, over every blob
the rank's index lists, while Dynamo's graph is split and walked. Each piece then finds its
bytes verified and its files unpacked; only Inductor's own load, which changes process state
(its cache directory), runs one at a time.

The rules of the cache hold: bytes come only through CacheEntry.get_blob (verified, a corrupt
blob quarantined), and the ref of each graph is still read and checked against them by
get_or_compute. A blob the index names but that is missing or bad is just not prefetched: the
piece's own lookup then sees the miss and compiles.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from kiln.workers.compilation.artifacts import ArtifactError, unpack_artifact

if TYPE_CHECKING:
    from kiln.cache import CacheEntry

log = logging.getLogger("kiln.compiler")

MAX_THREADS = 8


class Prefetch:
    """Blobs of one rank's index, read, verified and unpacked in the background."""

    def __init__(self, entry: CacheEntry, rank: int, extract_root: str, *, threads: int | None = None):
        self.entry = entry
        self.extract_root = extract_root
        self.start = time.time()
        self.end: float | None = None
        self._lock = threading.Lock()
        self._taken: set[str] = set()
        index = entry.rank_index(rank).read()
        digests = sorted({v["digest"] for v in index.values() if isinstance(v, dict) and v.get("digest")})
        workers = threads or min(MAX_THREADS, os.cpu_count() or 1, max(1, len(digests)))
        # Counted before the first task starts: a fast task counts itself down.
        self._pending = self.blobs = len(digests)
        if not digests:
            self.end = self.start
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kiln-prefetch")
        self._futures: dict[str, Future[tuple[bytes, str | None] | None]] = {
            d: self._pool.submit(self._fetch, d) for d in digests}

    def _fetch(self, digest: str) -> tuple[bytes, str | None] | None:
        try:
            data = self.entry.get_blob(digest)
            if data is None:
                return None
            try:
                target: str | None = unpack_artifact(data, self.extract_root)
            except ArtifactError as exc:
                # Verified bytes that are no artifact: the piece's own load will say so (and
                # invalidate them); nothing to unpack ahead of it.
                log.debug("prefetch: blob %s does not unpack: %s", digest, exc)
                target = None
            return data, target
        except Exception as exc:  # noqa: BLE001 - a prefetch is only a head start
            log.warning("prefetch of cache blob %s failed (%s); it is read when needed", digest, exc)
            return None
        finally:
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self.end = time.time()

    def _result(self, digest: str) -> tuple[bytes, str | None] | None:
        future = self._futures.get(digest)
        return future.result() if future is not None else None

    def bytes_of(self, digest: str) -> bytes | None:
        """The verified bytes of blob `digest` if it was prefetched (waits for it), else None."""
        found = self._result(digest)
        return found[0] if found is not None else None

    def take_unpacked(self, digest: str, data: bytes) -> str | None:
        """The directory blob `digest` was unpacked into, once, if those are the bytes `data`
        (identity: the very bytes get_or_compute returned); None otherwise."""
        found = self._result(digest)
        if found is None or found[0] is not data or found[1] is None:
            return None
        with self._lock:
            if digest in self._taken:
                return None
            self._taken.add(digest)
        return found[1]

    def close(self) -> None:
        """Wait for the threads; what no piece took stays unpacked under the extract root (it
        is removed with it at exit)."""
        self._pool.shutdown(wait=True)
        if self.end is None:
            self.end = time.time()
