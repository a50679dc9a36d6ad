"""Where the cache root lives, creating it private to the user, and refusing unsafe directories.

Cache artifacts are executable code: whoever can write into the cache can run code in every
process that loads from it. So directories kiln creates are 0o700, and kiln refuses a directory
that is a symlink, belongs to another user, or that group or others may write to.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from kiln.cache.atomic import fsync_dir
from kiln.cache.errors import CacheError, UnsafeCacheError

ROOT_ENV_VAR = "KILN_CACHE_ROOT"
DEFAULT_ROOT = "~/.cache/kiln"
PRIVATE_DIR_MODE = 0o700

# Errors that mean "this filesystem or directory does not let us write", as opposed to a bug.
NOT_WRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def default_root() -> Path:
    """$KILN_CACHE_ROOT if set and non-empty, else ~/.cache/kiln, with ~ expanded."""
    return Path(os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT).expanduser()


def resolve_root(root: str | os.PathLike | None, *, node: str | None = None, rank: int | None = None) -> Path:
    """The root a store, a worker or a CLI command uses: `root` if given, else default_root()
    ($KILN_CACHE_ROOT or ~/.cache/kiln), with ~ expanded and the placeholders `{node}` (one root
    per node on a shared filesystem) and `{rank}` (a private root per rank, which turns
    cross-rank compile-once off) replaced where `node` / `rank` are given. The driver and the
    workers both resolve roots through this one function."""
    text = os.fspath(root) if root is not None and os.fspath(root) != "" else str(default_root())
    if node is not None:
        text = text.replace("{node}", node)
    if rank is not None:
        text = text.replace("{rank}", str(rank))
    return Path(text).expanduser()


def open_existing_root(root: str | os.PathLike | None) -> Path:
    """The root for a command that only inspects: it must exist and pass check_root_safe.

    Raises CacheError naming the path if it does not exist (nothing is created).
    """
    path = resolve_root(root)
    if not os.path.lexists(path):
        raise CacheError(f"cache root {path} does not exist")
    check_root_safe(path)
    return path


def check_dir_safe(path: str | os.PathLike) -> None:
    """Raise UnsafeCacheError naming `path` if it is a symlink, not ours, or group/other-writable.

    Uses lstat, so a symlink is seen as one rather than followed. A missing path raises
    FileNotFoundError; a path that is not a directory raises CacheError.
    """
    path = Path(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"cache directory {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache path {path} exists but is not a directory")
    uid = _current_uid()
    if uid is not None and st.st_uid != uid:
        raise UnsafeCacheError(
            f"cache directory {path} is owned by uid {st.st_uid}, not by the current user (uid {uid}); "
            f"refusing to load code others control"
        )
    if st.st_mode & 0o022:
        raise UnsafeCacheError(
            f"cache directory {path} is group- or other-writable (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod go-w {path}` if it is yours"
        )


def check_root_safe(path: str | os.PathLike) -> None:
    """check_dir_safe for the cache root (the name the design and callers use)."""
    check_dir_safe(path)


def ensure_private_dir(path: str | os.PathLike, *, parents: bool = False) -> Path:
    """Create directory `path` with mode 0o700 if it is missing, then check_dir_safe it.

    With parents=True missing parents are made too, also 0o700: they lead only to the cache,
    and a umask-mode parent would let others list it. Existing parents are left as they are.
    Without it a missing parent raises FileNotFoundError, so that a writer never resurrects an
    entry that prune has just removed. An existing directory keeps its mode but must pass
    check_dir_safe.
    """
    path = Path(path)
    _make_private_dir(path, parents)
    check_dir_safe(path)
    return path


def _make_private_dir(path: Path, parents: bool) -> None:
    """mkdir 0o700 whatever the umask (parents first if asked), each new one made durable."""
    try:
        os.mkdir(path, mode=PRIVATE_DIR_MODE)
    except FileExistsError:
        return  # ours from before, or another process's just now: check_dir_safe judges it
    except FileNotFoundError:
        if not parents or path.parent == path:
            raise
        _make_private_dir(path.parent, parents=True)
        _make_private_dir(path, parents=False)
        return
    # The mode given to mkdir is filtered by the umask; chmod makes it exactly 0o700.
    os.chmod(path, PRIVATE_DIR_MODE)
    # A file fsynced into a directory whose own entry was never flushed can vanish at a power cut.
    fsync_dir(path.parent)


def is_writable(path: str | os.PathLike) -> bool:
    """Whether we may create files in directory `path` (os.access W_OK|X_OK).

    Note that for root os.access says yes to nearly everything; callers also treat
    EACCES/EROFS/EPERM from an actual write as "read-only".
    """
    return os.access(path, os.W_OK | os.X_OK)


def is_not_writable_error(error: BaseException) -> bool:
    """True if `error` is an OSError meaning the filesystem/directory refuses writes."""
    return isinstance(error, OSError) and error.errno in NOT_WRITABLE_ERRNOS


def _current_uid() -> int | None:
    # os.getuid does not exist on Windows; there is no POSIX owner to compare there.
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else None


def read_file_nofollow(path: str | os.PathLike) -> bytes:
    """The bytes of regular file `path`, refusing to follow a symlink at `path`.

    Raises FileNotFoundError if absent, UnsafeCacheError if `path` is a symlink (it could point
    anywhere outside the cache), CacheError if it is not a regular file.
    """
    # O_NOFOLLOW makes the check and the open one step, so a link swapped in after an lstat
    # cannot slip through. O_NONBLOCK keeps a FIFO planted under a cache name from hanging us.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):
            raise UnsafeCacheError(f"cache file {path} is a symlink; refusing to follow it") from None
        raise
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CacheError(f"cache file {path} is not a regular file")
        return f.read()


def is_real_dir(path: str | os.PathLike) -> bool:
    """A directory and not a symlink to one; False if it vanished meanwhile."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def listdir_or_empty(path: str | os.PathLike) -> list[str]:
    """The names in directory `path`; [] if it is missing or not a directory (it may vanish
    under a concurrent prune)."""
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
