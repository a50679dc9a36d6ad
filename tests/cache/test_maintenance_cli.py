"""`kiln cache ls|verify|prune|explain` through click's CliRunner, and the maintenance helpers."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import filelock
import pytest
from click.testing import CliRunner

import kiln.cache.verify
from kiln.cache import CacheStore, digest_bytes
from kiln.cache.atomic import TEMP_PREFIX
from kiln.cache.maintenance import diff_factors, flatten, format_path, format_size, parse_size
from kiln.orchestrator.cli_cache import cache_group, format_ranks

DAY = 86400

FACTORS_A = {"config_hash": "aaa", "compiler": {"torch": "2.13", "triton": "3.4"}, "env": {}}
FACTORS_B = {"config_hash": "bbb", "compiler": {"torch": "2.11", "triton": "3.4"}, "env": {"X": "1"}}


def cli(*args: str):
    return CliRunner().invoke(cache_group, [str(a) for a in args], catch_exceptions=False)


def fill(root, factors, *, graphs: int, size: int, ranks=(0,), age_days: float = 0):
    entry = CacheStore(root).entry(factors)
    for i in range(graphs):
        digest, _, _ = entry.get_or_compute(f"g{i}", lambda i=i: bytes([i]) * size)
        for r in ranks:
            entry.rank_index(r).update({f"piece{i}": {"digest": digest, "graph_key": f"g{i}"}})
    if age_days:
        then = time.time() - age_days * DAY
        os.utime(entry.path / "last_used", (then, then))
    return entry


@pytest.fixture
def two_entries(root):
    old = fill(root, FACTORS_A, graphs=3, size=300_000, ranks=(0, 1, 2, 3), age_days=10)
    new = fill(root, FACTORS_B, graphs=2, size=100_000, ranks=(0,))
    return old, new


# ----- ls -----


def test_ls_table(root, two_entries):
    old, new = two_entries
    result = cli("ls", "--root", root)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["KEY", "SIZE", "BLOBS", "RANKS"]
    row = next(line for line in lines if line.startswith(old.key)).split()
    assert 879.0 <= float(row[1]) < 900 and row[2:5] == ["KiB", "3", "0-3"]  # 3 x 300 kB of blobs, plus records
    created, last_used = row[5], row[6]
    assert created.endswith("Z") and last_used < created  # last_used was set 10 days back
    assert next(line for line in lines if line.startswith(new.key)).split()[3:5] == ["2", "0"]
    assert lines[-1].startswith("total: 2 entries, 1.")


def test_ls_json(root, two_entries):
    old, new = two_entries
    result = cli("ls", "--root", root, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    by_key = {e["key"]: e for e in doc["entries"]}
    assert by_key[old.key]["blobs"] == 3 and by_key[old.key]["ranks"] == [0, 1, 2, 3]
    assert by_key[new.key]["size"] >= 200_000
    assert doc["total"] == {"entries": 2, "size": sum(e["size"] for e in doc["entries"])}
    assert by_key[old.key]["last_used"] < by_key[new.key]["last_used"]


def test_ls_empty_and_missing_root(root, tmp_path):
    CacheStore(root)
    assert cli("ls", "--root", root).output.splitlines()[-1] == "total: 0 entries, 0 B"
    missing = tmp_path / "no-such-root"
    result = cli("ls", "--root", missing)
    assert result.exit_code == 2 and str(missing) in result.output and "does not exist" in result.output
    assert not missing.exists(), "looking must not create the root"


def test_unsafe_root_exit_2(root, two_entries):
    os.chmod(root, 0o777)
    for command in ("ls", "verify"):
        result = cli(command, "--root", root)
        assert result.exit_code == 2 and str(root) in result.output and "writable" in result.output


def test_default_root_from_env(root, two_entries, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_ROOT", str(root))
    assert json.loads(cli("ls", "--json").output)["total"]["entries"] == 2


# ----- verify -----


def test_verify_clean_then_flipped_byte(root, two_entries):
    old, _ = two_entries
    result = cli("verify", "--root", root)
    assert result.exit_code == 0, result.output
    assert "verified 2 entries: 5 blobs" in result.output and "0 quarantined" in result.output

    digest = old.lookup("g1")[0]
    blob = old.blob_path(digest)
    data = bytearray(blob.read_bytes())
    data[12345] ^= 0xFF
    blob.write_bytes(data)

    result = cli("verify", "--root", root)
    assert result.exit_code == 1
    assert f"quarantined {old.key}/blobs/{digest}" in result.output
    assert f"quarantined {old.key}/refs/g1.json" in result.output  # its ref names a blob now gone
    assert f"{old.key}/rank_0/index.json" in result.output  # rank indexes keep their good entries
    assert not blob.exists()
    assert set(old.rank_index(2).read()) == {"piece0", "piece2"}

    assert cli("verify", "--root", root).exit_code == 0  # everything bad is out of the way now


def test_verify_catches_bad_records(root, two_entries):
    old, new = two_entries
    (old.path / "refs" / "g0.json").write_text("{truncated")
    (new.path / "rank_0" / "index.json").write_text('{"schema": 1, "entries": [')
    (new.path / "key_factors.json").write_text(json.dumps({"config_hash": "tampered"}))
    result = cli("verify", "--root", root)
    assert result.exit_code == 1
    for bad in (f"{old.key}/refs/g0.json", f"{new.key}/rank_0/index.json", f"{new.key}/key_factors.json"):
        assert f"quarantined {bad}" in result.output
    assert "3 quarantined" in result.output
    assert len(os.listdir(new.path / "quarantine")) == 2


def test_verify_sets_aside_links_and_reports_unsafe_dirs(root, two_entries, tmp_path):
    old, new = two_entries
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    link = old.path / "blobs" / ("ab" * 16)
    link.symlink_to(outside)
    os.chmod(new.path / "refs", 0o777)
    result = cli("verify", "--root", root)
    assert result.exit_code == 1
    assert f"quarantined {old.key}/blobs/{'ab' * 16}: is a symlink" in result.output
    assert f"problem: cache directory {new.path / 'refs'} is group- or other-writable" in result.output
    assert outside.read_bytes() == b"not ours" and not os.path.lexists(link)


def test_verify_reports_a_rank_index_it_cannot_quarantine(root, two_entries, monkeypatch):
    _, new = two_entries
    (new.path / "rank_0" / "index.json").write_text("{broken")
    monkeypatch.setattr(kiln.cache.verify, "quarantine_file", lambda *args, **kwargs: None)  # as on a read-only mount
    result = cli("verify", "--root", root)
    assert result.exit_code == 1, result.output
    assert f"problem: {new.key}/rank_0/index.json: malformed rank index" in result.output


def test_verify_skips_what_vanishes_mid_run(root, two_entries, monkeypatch):
    old, new = two_entries
    orphan = old.put_blob(b"referenced by nothing")
    real_digest_file, real_check_dir_safe = kiln.cache.verify.digest_file, kiln.cache.verify.check_dir_safe

    def quarantined_meanwhile(path):  # by a warm-up that found the blob bad, say
        if Path(path).name == orphan:
            os.unlink(path)
        return real_digest_file(path)

    def pruned_meanwhile(path):  # prune renames the entry to trash before deleting it
        if Path(path) == new.path:
            os.replace(new.path, root / f".trash-{new.key}-1-0")
        return real_check_dir_safe(path)

    monkeypatch.setattr(kiln.cache.verify, "digest_file", quarantined_meanwhile)
    monkeypatch.setattr(kiln.cache.verify, "check_dir_safe", pruned_meanwhile)
    result = cli("verify", "--root", root)
    assert result.exit_code == 0, result.output
    assert "verified 1 entries: 3 blobs" in result.output


def test_verify_reports_unreadable_files_and_quarantines_nothing(root, two_entries, monkeypatch):
    old, _ = two_entries
    digest, ref = old.lookup("g1")[0], old.path / "refs" / "g0.json"
    real_digest_file, real_read = kiln.cache.verify.digest_file, kiln.cache.verify.read_file_nofollow

    def eio(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(kiln.cache.verify, "digest_file", lambda p: eio(p) if Path(p).name == digest else real_digest_file(p))
    monkeypatch.setattr(kiln.cache.verify, "read_file_nofollow", lambda p: eio(p) if Path(p) == ref else real_read(p))
    indexes = {r: old.rank_index(r).path.read_bytes() for r in range(4)}
    result = cli("verify", "--root", root)
    assert result.exit_code == 1, result.output
    assert f"problem: {old.key}/blobs/{digest}: cannot read it: {os.strerror(errno.EIO)}" in result.output
    assert f"problem: {old.key}/refs/g0.json: cannot read it" in result.output
    assert "0 quarantined, 2 problems" in result.output
    assert not (old.path / "quarantine").exists()
    assert {r: old.rank_index(r).path.read_bytes() for r in range(4)} == indexes  # entries naming it kept


def test_verify_leaves_an_index_alone_if_nothing_dangles_under_the_lock(root, two_entries, monkeypatch):
    _, new = two_entries
    late = b"published while verify waited for the index lock"
    new.rank_index(0).update({"late": {"digest": digest_bytes(late)}})  # its blob is not there yet
    index = (new.path / "rank_0" / "index.json").read_bytes()

    class PublishWhileWaiting(filelock.FileLock):
        def __enter__(self):
            new.put_blob(late)
            return super().__enter__()

    monkeypatch.setattr(filelock, "FileLock", PublishWhileWaiting)
    result = cli("verify", "--root", root)
    assert result.exit_code == 0, result.output
    assert (new.path / "rank_0" / "index.json").read_bytes() == index
    assert not (new.path / "quarantine").exists()


def test_verify_removes_stale_temp_files_in_quarantine(root, two_entries):
    old, _ = two_entries
    (old.path / "quarantine").mkdir(mode=0o700)
    stale, fresh = old.path / "quarantine" / f"{TEMP_PREFIX}1-dead", old.path / "quarantine" / f"{TEMP_PREFIX}2-live"
    stale.write_bytes(b"half a copy")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    result = cli("verify", "--root", root)
    assert f"removed stale temporary file {old.key}/quarantine/{stale.name}" in result.output
    assert not stale.exists() and fresh.exists()


# ----- prune -----


def test_prune_older_than(root, two_entries):
    old, new = two_entries
    dry = cli("prune", "--root", root, "--older-than", 7, "--dry-run")
    assert dry.exit_code == 0 and f"would remove {old.key}" in dry.output and new.key not in dry.output
    assert old.path.exists()

    result = cli("prune", "--root", root, "--older-than", 7)
    assert result.exit_code == 0 and f"removed {old.key}" in result.output
    assert CacheStore(root).keys() == [new.key]
    assert not [n for n in os.listdir(root) if n.startswith(".trash-")]


def test_prune_max_size_removes_least_recently_used(root, two_entries):
    old, new = two_entries
    third = fill(root, {"third": True}, graphs=1, size=50_000, age_days=1)
    result = cli("prune", "--root", root, "--max-size", "500K")
    assert result.exit_code == 0, result.output
    assert CacheStore(root).keys() == sorted([new.key, third.key])  # the 10-day-old one went first

    result = cli("prune", "--root", root, "--max-size", "240K")  # the two left make about 245 KiB
    assert result.exit_code == 0, result.output
    assert CacheStore(root).keys() == [new.key]  # then the next least recently used (a day old)
    assert cli("prune", "--root", root, "--max-size", "0").exit_code == 0
    assert CacheStore(root).keys() == []


def test_prune_not_stopped_by_a_leftover_trash_dir(root, two_entries):
    old, new = two_entries
    # Left by a prune killed mid-delete whose pid we now have: the old trash name, not empty.
    (root / f".trash-{old.key}-{os.getpid()}" / "blobs").mkdir(parents=True)
    result = cli("prune", "--root", root, "--older-than", 7)
    assert result.exit_code == 0, result.output
    assert CacheStore(root).keys() == [new.key]
    assert not [n for n in os.listdir(root) if n.startswith(".trash-")]


def test_prune_usage_errors(root, two_entries):
    result = cli("prune", "--root", root)
    assert result.exit_code == 2 and "--older-than" in result.output
    result = cli("prune", "--root", root, "--max-size", "lots")
    assert result.exit_code == 2 and "'lots'" in result.output
    assert len(CacheStore(root).keys()) == 2


# ----- explain -----


def test_explain_one_key(root, two_entries):
    old, _ = two_entries
    result = cli("explain", "--root", root, old.key)
    assert result.exit_code == 0
    assert json.loads(result.output) == FACTORS_A
    assert json.loads(cli("explain", "--root", root, old.key[:8]).output) == FACTORS_A  # unique prefix


def test_explain_diff(root, two_entries):
    old, new = two_entries
    result = cli("explain", "--root", root, old.key, new.key)
    assert result.exit_code == 0
    assert result.output.splitlines() == [
        'compiler.torch: "2.13" != "2.11"',
        'config_hash: "aaa" != "bbb"',
        "env: {} != <absent>",
        'env.X: <absent> != "1"',
    ]
    assert cli("explain", "--root", root, old.key, old.key).output.strip() == "identical factors"


def test_explain_tells_a_dotted_key_from_nesting(root):
    dotted, nested = CacheStore(root).entry({"a.b": 1}), CacheStore(root).entry({"a": {"b": 1}})
    result = cli("explain", "--root", root, dotted.key, nested.key)
    assert result.output.splitlines() == ["a.b: <absent> != 1", '"a.b": 1 != <absent>']


def test_explain_errors(root, two_entries, tmp_path):
    old, _ = two_entries
    result = cli("explain", "--root", root, "0" * 32)
    assert result.exit_code == 2 and "0" * 32 in result.output
    result = cli("explain", "--root", root, old.key, "feedface")
    assert result.exit_code == 2 and "feedface" in result.output
    result = cli("explain", "--root", tmp_path / "nowhere", old.key)
    assert result.exit_code == 2 and "nowhere" in result.output


# ----- helpers -----


def test_sizes_and_ranks():
    assert parse_size("500M") == 500 << 20 and parse_size("2G") == 2 << 30 and parse_size("1024") == 1024
    assert parse_size("1.5KiB") == 1536 and parse_size("3gb") == 3 << 30
    with pytest.raises(ValueError, match="'12X'"):
        parse_size("12X")
    assert (format_size(512), format_size(12.3 * (1 << 20)), format_size(5 << 40)) == ("512 B", "12.3 MiB", "5.0 TiB")
    assert (format_ranks([]), format_ranks([0]), format_ranks([0, 1, 2, 3, 5, 7, 8])) == ("-", "0", "0-3,5,7-8")


def test_flatten_and_diff():
    flat = flatten({"a": {"b": {"c": 1}, "d": [1, {"x": 2}]}, "e": {}})
    assert flat == {("a", "b", "c"): 1, ("a", "d"): [1, {"x": 2}], ("e",): {}}
    assert diff_factors({"a": 1}, {"a": 1}) == []
    assert flatten({"a.b": 1}) != flatten({"a": {"b": 1}})
    assert (format_path(("a", "b")), format_path(("a.b",)), format_path(("", "x"))) == ("a.b", '"a.b"', '"".x')
