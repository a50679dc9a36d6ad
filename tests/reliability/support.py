"""Helpers of the reliability tests: child processes, the `kiln` CLI, and looking into a cache.

Children run kiln_child.py with empty Inductor/Triton cache directories (so "compiled nothing"
is measured) and OMP_NUM_THREADS=1, the thread count Ray gives a one-CPU worker: the CPU
factors of the cache key then match those of a Ray warm-up, so one cold cache serves both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, settings

from kiln.cache.atomic import is_temp_name
from kiln.cache.digest import digest_bytes
from kiln.cache.records import make_index, parse_index, parse_ref
from tests.orchestrator.conftest import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("kiln_child.py")
MODEL = "examples/toy_llama.py:build"
# The tiny model compiles 2 unique pieces (its first and last); the attention piece runs eagerly.
UNIQUE_PIECES = 2

# Hypothesis for the bad-input tests: small runs (CI), no example database left in the working
# tree, and tmp_path/monkeypatch shared by the examples on purpose (the kiln.cache root must stay
# absent across all of them).
SMALL = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def tiny_model_args() -> list[str]:
    """`--model-arg NAME=VALUE` options of `kiln warmup` for the tiny model."""
    return [f"--model-arg={name}={value}" for name, value in TINY.items()]


def child_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a child: the repo importable, fresh empty compiler caches, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    n = len(list(tmp_path.glob("inductor-*")))
    (tmp_path / f"inductor-{n}").mkdir()
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / f"inductor-{n}")
    env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton-{n}")
    return env


def child_args(spec: dict) -> list[str]:
    spec = {"model": TINY, **spec}
    return [sys.executable, str(CHILD), json.dumps(spec)]


def start_child(spec: dict, tmp_path: Path) -> subprocess.Popen:
    """Start kiln_child.py (for a test that kills it); stdout and stderr are piped."""
    return subprocess.Popen(child_args(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(tmp_path), cwd=REPO_ROOT)


def run_child(spec: dict, tmp_path: Path) -> dict:
    """Run kiln_child.py to the end; its JSON result plus "stderr". Fails on a non-zero exit."""
    proc = subprocess.run(child_args(spec), capture_output=True, text=True, env=child_env(tmp_path),
                          cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 0, f"child exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Wait until `path` exists (the child reached its fault); returns its mtime."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before {path.name}:\n{proc.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.05)
    return path.stat().st_mtime


def cli(*args: str):
    """`kiln ARGS` in-process (click's CliRunner); the click Result."""
    from click.testing import CliRunner

    from kiln.orchestrator.cli import main

    return CliRunner().invoke(main, list(args))


def verify_clean(root: Path) -> str:
    """Run `kiln cache verify --root ROOT`; assert it exits 0; return its output."""
    result = cli("cache", "verify", "--root", str(root))
    assert result.exit_code == 0, f"kiln cache verify exited {result.exit_code}:\n{result.output}"
    return result.output


def index_entries(root: Path, key: str, rank: int = 0) -> dict[str, dict]:
    """The entries of rank `rank`'s index in entry `key`: "piece_<i>/size_<s>" → record."""
    return parse_index((root / key / f"rank_{rank}" / "index.json").read_bytes())


def blob_of_piece(root: Path, key: str, piece: int, size: str = "sym") -> Path:
    """The blob file that piece `piece` at size `size` loads."""
    return root / key / "blobs" / index_entries(root, key)[f"piece_{piece}/size_{size}"]["digest"]


def drop_artifact(entry: Path, digest: str) -> None:
    """Remove one artifact, its ref and its index entries: as if it had never been compiled."""
    (entry / "blobs" / digest).unlink()
    for ref in (entry / "refs").glob("*.json"):
        if parse_ref(ref.read_bytes())["digest"] == digest:
            ref.unlink()
    index = entry / "rank_0" / "index.json"
    kept = {name: v for name, v in parse_index(index.read_bytes()).items() if v["digest"] != digest}
    index.write_text(json.dumps(make_index(kept)))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` → "size:digest" of a file, "-> target" of a link, "dir" of a dir."""
    out = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(base) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"-> {os.readlink(path)}"
            elif path.is_file():
                data = path.read_bytes()
                out[rel] = f"{len(data)}:{digest_bytes(data)}"
            else:
                out[rel] = "dir"
    return out


def half_written(root: Path) -> list[str]:
    """What a crash-safe writer must never leave: temporary files, refs or index entries that
    name a missing blob, and blobs whose size differs from their ref's."""
    bad = []
    for base, _, files in os.walk(root):
        bad += [os.path.join(base, n) for n in files if is_temp_name(n)]
    for entry in [p for p in root.iterdir() if (p / "key_factors.json").exists()]:
        blobs = entry / "blobs"
        for ref_path in (entry / "refs").glob("*.json") if (entry / "refs").is_dir() else []:
            ref = parse_ref(ref_path.read_bytes())
            blob = blobs / ref["digest"]
            if not blob.is_file() or blob.stat().st_size != ref["size"]:
                bad.append(f"{ref_path}: names a missing or short blob")
        for index in entry.glob("rank_*/index.json"):
            for name, value in parse_index(index.read_bytes()).items():
                if not (blobs / value["digest"]).is_file():
                    bad.append(f"{index} entry {name}: names a missing blob")
    return bad


def lines_naming(text: str, name: str) -> list[str]:
    """The lines of `text` (a child's stderr) that mention `name`."""
    return [line for line in text.splitlines() if name in line]
