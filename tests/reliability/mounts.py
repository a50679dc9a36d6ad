"""Small tmpfs mounts: a cache root that is really read-only, or really full.

As root, chmod does not make a directory read-only (root writes anyway), and a full disk cannot
be simulated faithfully from Python; a tmpfs remounted read-only, or one too small for an
artifact, gives the real errors (EROFS, ENOSPC). Needs root with CAP_SYS_ADMIN: the fixture
skips, with the reason, where mounting is not allowed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


class Mounts:
    """Mounts made by one test; unmount_all() undoes them (the fixture calls it, always)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> Path:
        """Mount a tmpfs of `size` (e.g. "8m", "64k") at `path`, private to us (0700)."""
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine")
        path.mkdir(parents=True, exist_ok=True)
        # mode=0700: a tmpfs root is 1777 by default, which kiln rightly refuses as unsafe.
        done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
        self.paths.append(path)
        return path

    def read_only(self, path: Path) -> None:
        """Remount the tmpfs at `path` read-only."""
        done = _run("mount", "-o", "remount,ro", str(path))
        if done.returncode != 0:
            pytest.skip(f"cannot remount a tmpfs read-only here: {done.stderr.strip()}")

    def resize(self, path: Path, size: str) -> None:
        """Change the size of the tmpfs at `path` (it may not shrink below what it holds)."""
        done = _run("mount", "-o", f"remount,size={size}", str(path))
        if done.returncode != 0:
            pytest.skip(f"cannot resize a tmpfs here: {done.stderr.strip()}")

    def unmount_all(self) -> None:
        for path in reversed(self.paths):
            if _run("umount", str(path)).returncode != 0:
                _run("umount", "-l", str(path))  # still busy: detach it now, free it when idle
        self.paths.clear()

