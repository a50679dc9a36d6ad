"""Atomic file replacement: readers see the old file or the new one, never a partial one.

A file is written to a temporary name in its final directory, flushed and fsynced, renamed over
the final name (atomic within one filesystem), and then the directory is fsynced so the rename
itself survives a power cut. Temporary names start with TEMP_PREFIX; loaders never look at them.
A crash leaves one such file behind per write it interrupted (several processes and threads may
be writing at once); `kiln cache verify` removes them once stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from collections.abc import Iterator
from typing import Any, BinaryIO

TEMP_PREFIX = ".tmp-"

# Bytes handed to one os.write call. Large blobs go out in steps so a short write is retried
# from where it stopped rather than assumed complete.
WRITE_CHUNK = 1 << 20

# Private to the user, whatever the umask: cache files are executable code.
FILE_MODE = 0o600


def is_temp_name(name: str) -> bool:
    """True for the temporary files atomic_write_bytes leaves behind only if it is killed."""
    return name.startswith(TEMP_PREFIX)


def temp_name() -> str:
    """A fresh temporary file name, unique across processes (pid) and threads (random)."""
    return f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """Write `path` through the yielded binary file, atomically (file mode `mode`, private by
    default): the bytes go to a temporary file in the same directory, which is flushed, fsynced
    and renamed over `path` when the block ends. If the block (or the write) fails, Ctrl-C and
    ENOSPC included, the temporary file is removed, `path` is left as it was, and the error is
    re-raised."""
    path = Path(path)
    tmp = path.parent / temp_name()
    # O_EXCL: never reuse someone else's file; O_NOFOLLOW: never write through a planted link.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave the temp file behind.
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *,
                       mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` atomically (see atomic_output)."""
    with atomic_output(path, mode=mode) as f:
        _write_all(f.fileno(), memoryview(data).cast("B"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Replace `path` with `obj` as readable JSON (sorted keys, indented), atomically."""
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk. Best effort: the rename has
    already happened and is visible; some filesystems cannot fsync a directory at all."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    """Write every byte of `view` to `fd`, in WRITE_CHUNK steps, retrying short writes."""
    offset = 0
    while offset < len(view):
        offset += os.write(fd, view[offset : offset + WRITE_CHUNK])
