"""Hostile cache directories, through `kiln warmup` on a Ray worker (not only CacheStore).

A root that others can write to, one owned by another user, a symlinked root, and a blob or
rank index that is a symlink pointing out of the root: cache artifacts are executable code, so
each is refused with an error naming the path and the reason, and nothing is written or followed.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.reliability.support import MODEL, blob_of_piece, cli, snapshot, tiny_model_args

pytestmark = pytest.mark.reliability

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def warmup(root, address: str):
    """`kiln warmup` of the tiny model on the test's Ray cluster (in-process CLI)."""
    return cli("warmup", MODEL, "--tp", "1", "--sizes", "2", *tiny_model_args(), "--cache-root", str(root),
               "--address", address, "--quiet")


def assert_refused(result, *words: str) -> None:
    output = result.output
    assert result.exit_code == 1, f"expected a refusal, got exit {result.exit_code}:\n{output}"
    assert "kiln warmup failed" in output and "Traceback" not in output, output
    for word in words:
        assert word in output, (word, output)


def writable_by_others(root, _tmp_path):
    os.chmod(root, 0o777)
    return root


def owned_by_another_user(root, _tmp_path):
    if not RUNNING_AS_ROOT:
        pytest.skip("making a directory owned by another user needs root (chown)")
    os.chown(root, 65534, 65534)
    return root


def symlink_to_it(root, tmp_path):
    link = tmp_path / "link-to-root"
    link.symlink_to(root)
    return link


HOSTILE_ROOTS = {
    "writable by others": (writable_by_others, "group- or other-writable"),
    "owned by another user": (owned_by_another_user, "owned by uid 65534"),
    "a symlink": (symlink_to_it, "is a symlink"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_ROOTS))
def test_hostile_root_is_refused_by_warmup(ray_local, cache_copy, tmp_path, figure, kind):
    figure.scenario = f"hostile dir: root {kind}"
    root, _ = cache_copy
    make_hostile, reason = HOSTILE_ROOTS[kind]
    given = make_hostile(root, tmp_path)
    before = snapshot(root)
    figure.fault()
    assert_refused(warmup(given, ray_local), str(given), reason, "phase 'open_cache'")
    figure.recovered()
    assert snapshot(root) == before


@pytest.mark.parametrize("what", ["blob", "rank index"])
def test_symlink_out_of_the_root_is_refused_by_warmup(ray_local, cache_copy, tmp_path, figure, what):
    figure.scenario = f"hostile dir: {what} symlinked out of the root"
    root, cold = cache_copy
    key = cold["key"]
    path = blob_of_piece(root, key, 0) if what == "blob" else root / key / "rank_0" / "index.json"
    outside = tmp_path / "outside"
    outside.mkdir()
    # The link points at the file's own bytes: even content that verifies is never read via a link.
    target = outside / path.name
    shutil.move(path, target)
    path.symlink_to(target)
    content = target.read_bytes()
    figure.fault()
    result = warmup(root, ray_local)
    assert result.exit_code != 0, (
        "the warm-up did not even try the planted link: did the Ray worker compute another cache key "
        f"than the child that filled the cache (OMP_NUM_THREADS?)\n{result.output}")
    assert_refused(result, str(path), "is a symlink; refusing to follow it")
    figure.recovered()
    assert target.read_bytes() == content and path.is_symlink()
