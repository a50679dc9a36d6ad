"""A cache root on a read-only filesystem, and one on a full one (real tmpfs mounts).

Both start from a warm cache lacking one artifact. Read-only: the warm-up loads what is there,
compiles the rest, runs, and warns once that nothing will be saved; not a byte changes. Full
(no room for the new artifact): it compiles and runs without saving, warns once, and leaves
nothing half-written: no temporary files, no partial blobs, no ref or index entry naming a blob
that is not there; `kiln cache verify` is clean.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.reliability.support import (
    UNIQUE_PIECES,
    drop_artifact,
    half_written,
    index_entries,
    lines_naming,
    run_child,
    snapshot,
    verify_clean,
)

pytestmark = pytest.mark.reliability

MAX_ERR = 1e-3


def warm_but_one_on_tmpfs(cold_cache, mounts, mount_point):
    """The warm cache copied onto a fresh tmpfs, less one artifact: (root, its key)."""
    cold_root, cold = cold_cache
    key = cold["key"]
    root = mounts.tmpfs(mount_point, "8m")
    shutil.copytree(cold_root, root, symlinks=True, dirs_exist_ok=True)
    drop_artifact(root / key, next(iter(index_entries(root, key).values()))["digest"])
    return root, key


def run_warmup_that_cannot_save(root, tmp_path, problem: str) -> None:
    """The next warm-up loads the kept artifact, compiles the dropped one, runs correctly, saves
    nothing, and warns once that nothing will be saved, naming `problem`."""
    result = run_child({"root": str(root)}, tmp_path)
    record = result["record"]
    assert (record["cache_hits"], record["inductor_compiles"], record["artifacts_saved"]) == (UNIQUE_PIECES - 1, 1, 0)
    assert result["max_err"] < MAX_ERR
    warnings = lines_naming(result["stderr"], "will not be saved")
    assert len(warnings) == 1 and problem in warnings[0], result["stderr"]


@pytest.mark.slow  # CI covers failing writes with the full disk below
def test_read_only_root_compiles_runs_and_saves_nothing(cold_cache, tmp_path, mounts, figure):
    figure.scenario = "hostile dir: read-only root"
    root, _ = warm_but_one_on_tmpfs(cold_cache, mounts, tmp_path / "read-only")
    mounts.read_only(root)
    before = snapshot(root)
    figure.fault()

    run_warmup_that_cannot_save(root, tmp_path, f"{root} is read-only")
    assert snapshot(root) == before
    verify_clean(root)
    figure.recovered()


def test_full_disk_compiles_without_saving_and_leaves_nothing_half_written(cold_cache, tmp_path, mounts, figure):
    figure.scenario = "hostile dir: full disk"
    root, key = warm_but_one_on_tmpfs(cold_cache, mounts, tmp_path / "full")
    kept = index_entries(root, key)
    # Shrink the filesystem to what it holds plus room for small files (an index rewrite, lock
    # files), never for the artifact to be compiled again (hundreds of KiB).
    st = os.statvfs(root)
    mounts.resize(root, f"{(st.f_blocks - st.f_bfree) * st.f_frsize // 1024 + 64}k")
    figure.fault()

    run_warmup_that_cannot_save(root, tmp_path, "No space left on device")
    assert half_written(root) == []
    assert index_entries(root, key) == kept, "the index may only name artifacts that were saved"
    verify_clean(root)
    figure.recovered()
