"""Exceptions raised by the on-disk cache."""

from __future__ import annotations


class CacheError(Exception):
    """The cache was misused (bad key, bad factors) or its contents cannot be used as asked."""


class UnsafeCacheError(CacheError):
    """A cache path could be altered by someone else (wrong owner, group/other-writable, a symlink).

    Cache artifacts are executable code, so kiln refuses to read or write through such a path.
    """
