"""Moving bad files aside: out of the paths loaders read, but kept for a post-mortem."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from kiln.cache.layout import QUARANTINE
from kiln.cache.errors import CacheError
from kiln.cache.permissions import ensure_private_dir

logger = logging.getLogger("kiln.cache")


def quarantine_name(name: str) -> str:
    """`<name>.<UTC timestamp>-<pid>`: unique, sortable, and says when it was set aside."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    return f"{name}.{stamp}-{os.getpid()}"


def quarantine_file(
    entry_dir: Path, path: Path, reason: str, *, name: str | None = None, level: int = logging.WARNING
) -> Path | None:
    """Move `path` to `<entry_dir>/quarantine/<name>.<timestamp>` and log (a warning) naming it.

    `level` lowers the log level of a move that only follows from another file's problem, which
    was already reported: the user should see one warning per bad file, not one per side effect.

    Returns the new path, or None if the file was already gone (another process quarantined or
    replaced it first) or could not be moved (read-only cache; the warning says so). A symlink
    is moved as the link itself, never followed.
    """
    target_dir = entry_dir / QUARANTINE
    target = target_dir / quarantine_name(name or path.name)
    try:
        ensure_private_dir(target_dir)
        os.replace(path, target)
    except (OSError, CacheError) as e:  # CacheError: quarantine/ is unsafe (a symlink, say)
        if isinstance(e, FileNotFoundError) and not os.path.lexists(path):
            return None  # another process moved or replaced it first: nothing left to do
        logger.warning("cache file %s is bad (%s) and could not be quarantined: %s", path, reason, e)
        return None
    logger.log(level, "cache file %s is bad (%s); moved to %s", path, reason, target)
    return target
