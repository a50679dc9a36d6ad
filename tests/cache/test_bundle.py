"""`kiln cache export|import|keygen`: bundles that verify whole before anything is written."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.cache import CacheStore
from kiln.cache.bundle import MANIFEST, SIGNATURE
from kiln.orchestrator.cli_cache import cache_group

try:
    import cryptography  # noqa: F401
except ImportError:
    HAVE_CRYPTOGRAPHY = False
else:
    HAVE_CRYPTOGRAPHY = True
# Signing needs the 'sign' extra (the test extra has it); everything else runs without it.
needs_crypto = pytest.mark.skipif(not HAVE_CRYPTOGRAPHY, reason="needs the 'cryptography' package (extra 'sign')")

FACTORS_A = {"config_hash": "aaa", "compiler": {"torch": "2.13"}, "env": {}}
FACTORS_B = {"config_hash": "bbb", "compiler": {"torch": "2.13"}, "env": {}}


def cli(*args):
    return CliRunner().invoke(cache_group, [str(a) for a in args], catch_exceptions=False)


def fill(root, factors, graphs, ranks=(0,), size=5000):
    entry = CacheStore(root).entry(factors)
    for i in graphs:
        digest, _, _ = entry.get_or_compute(f"g{i}", lambda i=i: bytes([i]) * size + factors["config_hash"].encode())
        for r in ranks:
            entry.rank_index(r).update({f"piece_{i}/size_sym": {"digest": digest, "graph_key": f"g{i}"}})
    return entry


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (by relative path) with its bytes, leaving out what bundles omit."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part in ("locks", "quarantine", "last_used") or part.endswith(".lock")
                                      for part in rel.split("/")):
            out[rel] = path.read_bytes()
    return out


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "source"
    a = fill(root, FACTORS_A, range(3), ranks=(0, 1))
    b = fill(root, FACTORS_B, range(2))
    return root, a, b


@pytest.fixture
def bundle(source, tmp_path):
    root, _, _ = source
    out = tmp_path / "bundle.tar"
    result = cli("export", "--root", root, "-o", out)
    assert result.exit_code == 0, result.output
    assert "exported 2 entries" in result.output
    return out


@pytest.fixture
def keys(tmp_path):
    made = {}
    for name in ("ours", "theirs"):
        private, public = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub"
        result = cli("keygen", private, public)
        assert result.exit_code == 0, result.output
        made[name] = (private, public)
    return made


def rewrite(src: Path, dst: Path, *, manifest=None, members=None, extra=()) -> Path:
    """Copy the bundle `src` to `dst`, changing its manifest (a function of the parsed doc) or
    members (a function (name, bytes) -> bytes), and appending `extra` TarInfos (with data)."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()
            if info.name == MANIFEST and manifest is not None:
                data = (json.dumps(manifest(json.loads(data)), indent=1) + "\n").encode()
            elif members is not None:
                data = members(info.name, data)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        for info, data in extra:
            out.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def assert_refused(result, *expected: str):
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output, result.output


# ----- round trip -----


def test_export_import_verify_roundtrip(source, bundle, tmp_path):
    root, a, b = source
    dest = tmp_path / "dest"
    result = cli("import", bundle, "--root", dest)
    assert result.exit_code == 0, result.output
    assert f"added {a.key}" in result.output and f"added {b.key}" in result.output
    assert "2 added, 0 merged, 0 skipped" in result.output
    assert tree(dest) == tree(root)
    assert oct(os.stat(dest / a.key).st_mode & 0o777) == "0o700"
    assert not [n for n in os.listdir(dest) if n.startswith(".")], "the staging directory stayed"
    verified = cli("verify", "--root", dest)
    assert verified.exit_code == 0 and "verified 2 entries: 5 blobs" in verified.output, verified.output
    # And the store loads it as a cache: every graph hits.
    entry = CacheStore(dest).entry(FACTORS_A)
    assert all(entry.lookup(f"g{i}") is not None for i in range(3))

    again = cli("import", bundle, "--root", dest)
    assert again.exit_code == 0 and "0 added, 0 merged, 2 skipped" in again.output, again.output


def test_export_chosen_keys_by_prefix(source, tmp_path):
    root, a, b = source
    out = tmp_path / "one.tar"
    assert cli("export", b.key[:6], "--root", root, "-o", out).exit_code == 0
    with tarfile.open(out) as tar:
        keys = {n.split("/")[0] for n in tar.getnames() if "/" in n}
    assert keys == {b.key}
    assert_refused(cli("export", "nosuchkey", "--root", root, "-o", tmp_path / "x.tar"), "no cache entry 'nosuchkey'")
    assert not (tmp_path / "x.tar").exists()


def test_import_merges_what_an_existing_entry_lacks(source, bundle, tmp_path):
    root, a, _ = source
    dest = tmp_path / "dest"
    mine = fill(dest, FACTORS_A, [0, 7], ranks=(0,))  # g0 as in the bundle, g7 of its own
    result = cli("import", bundle, "--root", dest)
    assert result.exit_code == 0, result.output
    assert f"merged {a.key}" in result.output
    assert set(mine.rank_index(0).read()) == {f"piece_{i}/size_sym" for i in (0, 1, 2, 7)}
    assert set(mine.rank_index(1).read()) == {f"piece_{i}/size_sym" for i in (0, 1, 2)}
    assert all(mine.lookup(f"g{i}") is not None for i in (0, 1, 2, 7))
    assert cli("verify", "--root", dest).exit_code == 0


def test_export_refuses_a_corrupt_entry(source, tmp_path):
    root, a, _ = source
    blob = next((a.path / "blobs").iterdir())
    blob.write_bytes(b"x" + blob.read_bytes()[1:])
    assert_refused(cli("export", "--root", root, "-o", tmp_path / "b.tar"), "corrupt", "kiln cache verify")
    assert not (tmp_path / "b.tar").exists()


# ----- refused bundles write nothing -----


def flip_blob_byte(src: Path, dst: Path) -> Path:
    shutil.copy(src, dst)
    with tarfile.open(dst) as tar:
        info = next(i for i in tar.getmembers() if "/blobs/" in i.name)
    with open(dst, "r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dst


def _member(name, kind=tarfile.REGTYPE, data=b"x", linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


KEY = "0" * 32
BAD_BUNDLES = {
    "flipped blob byte": (lambda b, d: flip_blob_byte(b, d), "hashes to"),
    "flipped record byte": (lambda b, d: rewrite(b, d, members=lambda n, x: x.replace(b'"size"', b'"sizf"')
                                                 if "/refs/" in n else x), "does not match its digest"),
    "foreign schema": (lambda b, d: rewrite(b, d, manifest=lambda m: {**m, "schema": {"index": 2}}), "cache schema"),
    "foreign format": (lambda b, d: rewrite(b, d, manifest=lambda m: {**m, "format": 99}), "format 99"),
    "dot-dot member": (lambda b, d: rewrite(b, d, extra=[_member(f"{KEY}/../../evil")]), "escapes"),
    "absolute member": (lambda b, d: rewrite(b, d, extra=[_member("/tmp/evil")]), "absolute"),
    "symlink member": (lambda b, d: rewrite(b, d, extra=[_member(f"{KEY}/blobs/{'a' * 32}", tarfile.SYMTYPE,
                                                                 linkname="/etc/passwd")]), "symbolic link"),
    "hard link member": (lambda b, d: rewrite(b, d, extra=[_member(f"{KEY}/x", tarfile.LNKTYPE,
                                                                   linkname=MANIFEST)]), "hard link"),
    "device member": (lambda b, d: rewrite(b, d, extra=[_member(f"{KEY}/dev", tarfile.CHRTYPE)]), "a device"),
    "unlisted member": (lambda b, d: rewrite(b, d, extra=[_member(f"{KEY}/blobs/{'a' * 32}")]), "not in the bundle's manifest"),
    "duplicate member": (lambda b, d: rewrite(b, d, extra=[_member(MANIFEST, data=b"{}")]), "appears twice"),
    "not a tar": (lambda b, d: d.write_bytes(b"not a tar at all" * 100) and d, "not a readable tar"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES))
def test_refused_bundle_writes_nothing(case, bundle, tmp_path):
    make, why = BAD_BUNDLES[case]
    bad = make(bundle, tmp_path / "bad.tar")
    fresh = tmp_path / "fresh"
    assert_refused(cli("import", bad, "--root", fresh), why)
    assert not fresh.exists(), f"{case}: a refused import into a new root left {list(fresh.rglob('*'))}"


def test_refused_bundle_leaves_an_existing_root_as_it_was(source, bundle, tmp_path):
    root, _, _ = source
    dest = tmp_path / "dest"
    fill(dest, FACTORS_B, [5])
    before = tree(dest)
    assert_refused(cli("import", flip_blob_byte(bundle, tmp_path / "bad.tar"), "--root", dest), "damaged")
    assert tree(dest) == before
    assert not [n for n in os.listdir(dest) if n.startswith(".")]


def test_a_killed_imports_staging_dir_is_removed(bundle, tmp_path):
    dest = tmp_path / "dest"
    CacheStore(dest)
    stale = dest / ".import-999999999-dead"
    (stale / KEY).mkdir(parents=True)
    then = time.time() - 7200
    os.utime(stale, (then, then))
    assert cli("import", bundle, "--root", dest).exit_code == 0
    assert not stale.exists()


# ----- signatures -----


@needs_crypto
def test_signed_bundle_imports_with_the_right_key(source, keys, tmp_path):
    root, a, _ = source
    private, public = keys["ours"]
    signed = tmp_path / "signed.tar"
    result = cli("export", "--root", root, "-o", signed, "--sign", private)
    assert result.exit_code == 0 and "signed by SHA256:" in result.output, result.output
    result = cli("import", signed, "--root", tmp_path / "dest", "--require-signature", public)
    assert result.exit_code == 0, result.output
    assert "signature: verified SHA256:" in result.output and f"added {a.key}" in result.output
    # Without --require-signature the signature is reported, not trusted.
    result = cli("import", signed, "--root", tmp_path / "other")
    assert "signature: present, not checked" in result.output


def edit_created(doc):
    return {**doc, "created": "2000-01-01T00:00:00Z"}


SIGNATURE_CASES = {
    "unsigned": (lambda signed, unsigned, d: unsigned, "not signed"),
    "another key": (None, "signed by another key"),
    "manifest edited after signing": (lambda signed, unsigned, d: rewrite(signed, d, manifest=edit_created),
                                      "does not match its manifest"),
    "signature damaged": (lambda signed, unsigned, d: rewrite(
        signed, d, members=lambda n, x: x.replace(b'"signature": "', b'"signature": "AAAA') if n == SIGNATURE else x),
        "does not match its manifest"),
}


@needs_crypto
@pytest.mark.parametrize("case", sorted(SIGNATURE_CASES))
def test_require_signature_refuses(case, source, bundle, keys, tmp_path):
    root, _, _ = source
    make, why = SIGNATURE_CASES[case]
    signer = keys["theirs" if case == "another key" else "ours"][0]
    signed = tmp_path / "signed.tar"
    assert cli("export", "--root", root, "-o", signed, "--sign", signer).exit_code == 0
    bad = signed if make is None else make(signed, bundle, tmp_path / "bad.tar")
    dest = tmp_path / "dest"
    assert_refused(cli("import", bad, "--root", dest, "--require-signature", keys["ours"][1]), why)
    assert not dest.exists()


@needs_crypto
def test_keygen_never_overwrites(keys, tmp_path):
    private, public = keys["ours"]
    before = private.read_bytes()
    assert oct(os.stat(private).st_mode & 0o777) == "0o600"
    assert_refused(cli("keygen", private, tmp_path / "new.pub"), "already exists")
    assert private.read_bytes() == before and not (tmp_path / "new.pub").exists()


@needs_crypto
def test_keys_made_with_openssl_work(source, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on this machine")
    root, _, _ = source
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", private], check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", private, "-pubout", "-out", public], check=True, capture_output=True)
    signed = tmp_path / "signed.tar"
    assert cli("export", "--root", root, "-o", signed, "--sign", private).exit_code == 0
    result = cli("import", signed, "--root", tmp_path / "dest", "--require-signature", public)
    assert result.exit_code == 0, result.output
    assert_refused(cli("import", signed, "--root", tmp_path / "d2", "--require-signature", private), "private key")


def test_bundles_need_neither_torch_nor_ray():
    import sys

    code = ("import sys, kiln.cache.bundle, kiln.cache.bundle_import, kiln.cache.signing, kiln.orchestrator.cli_cache;"
            "bad = [m for m in ('torch', 'ray', 'cryptography') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_signing_without_cryptography_says_how_to_install(monkeypatch, tmp_path):
    import sys

    for name in [n for n in sys.modules if n == "cryptography" or n.startswith("cryptography.")] or ["cryptography"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    assert_refused(cli("keygen", tmp_path / "k", tmp_path / "k.pub"), "torch-kiln[sign]")
