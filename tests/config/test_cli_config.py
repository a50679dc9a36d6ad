"""`kiln config show|hash` through click's CliRunner."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from kiln.orchestrator.cli_config import config_group
from kiln.workers.config import CompilationConfig

HASH_LINE = re.compile(r"[0-9a-f]{32}")


def runner() -> CliRunner:
    # click 8.1 mixes stderr into stdout unless told otherwise; 8.2 dropped the argument and
    # always keeps result.stdout separate.
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


def invoke(*args: str):
    return runner().invoke(config_group, list(args), catch_exceptions=False)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def write(tmp_path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_hash_default():
    result = invoke("hash")
    assert result.exit_code == 0, result.output
    assert HASH_LINE.fullmatch(last_line(result.stdout))
    assert last_line(result.stdout) == CompilationConfig().compute_hash()


def test_hash_ignores_cache_dir_and_sizes(tmp_path):
    base = {"custom_ops": ["none", "+rms_norm"], "compile_sizes": [1, 2]}
    files = [
        write(tmp_path, "a.json", base),
        write(tmp_path, "b.json", {**base, "cache_dir": "/elsewhere"}),
        write(tmp_path, "c.json", {**base, "cudagraph_capture_sizes": [1, 2, 4, 8]}),
        write(tmp_path, "d.json", {**base, "compile_sizes": [16], "debug_dump_path": "/d"}),
    ]
    hashes = {last_line(invoke("hash", path).stdout) for path in files}
    assert len(hashes) == 1
    sdpa = ["aten::scaled_dot_product_attention"]
    other = write(tmp_path, "e.json", {**base, "splitting_ops": sdpa})
    assert last_line(invoke("hash", other).stdout) not in hashes
    # the same change through --set
    overridden = invoke("hash", files[0], "--set", f"splitting_ops={json.dumps(sdpa)}")
    assert last_line(overridden.stdout) == last_line(invoke("hash", other).stdout)


def test_hash_factors():
    result = invoke("hash", "--factors", "--set", "level=2")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert json.loads("\n".join(lines[:-1]))["level"] == 2
    assert lines[-1] == CompilationConfig(level=2).compute_hash()


def test_show_loads_back(tmp_path):
    path = write(tmp_path, "c.json", {"level": "piecewise", "custom_ops": ["all"]})
    overrides = ["--set", "pass_config.enable_noop=false", "--set", "cudagraph_mode=full"]
    result = invoke("show", path, *overrides)
    assert result.exit_code == 0, result.output
    config = CompilationConfig.from_json(result.stdout)
    assert config.custom_ops == ["all"]
    assert config.pass_config.enable_noop is False
    assert config.cudagraph_mode.name == "FULL"
    shown = tmp_path / "shown.json"
    shown.write_text(result.stdout)
    assert last_line(invoke("hash", str(shown)).stdout) == config.compute_hash()


def test_show_warnings_go_to_stderr():
    result = invoke("show", "--set", "splitting_ops=[]")
    assert result.exit_code == 0
    assert "splitting_ops is empty" in result.stderr
    assert CompilationConfig.from_json(result.stdout).cudagraph_mode.name == "FULL"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", 'compile_sizes=[1,"x"]'], "compile_sizes"),
        (["--set", "cudagraph_mode=sometimes"], "cudagraph_mode"),
        (["--set", "pass_config.enable_fusion=true"], "pass_config.enable_fusion: not implemented"),
        (["--set", "levle=3"], "did you mean 'level'"),
        (["--set", "level"], "malformed override"),
        (["--set", "inductor_passes.p=kiln_no_such_mod:f"], "inductor_passes.p"),
        (["--set", "use_cudagraph=false", "--set", "cudagraph_mode=full"], "use_cudagraph"),
    ],
)
@pytest.mark.parametrize("command", ["show", "hash"])
def test_invalid_exits_2(command, args, needle):
    result = invoke(command, *args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_invalid_file(tmp_path):
    missing = tmp_path / "missing.json"
    result = invoke("hash", str(missing))
    assert result.exit_code == 2 and "missing.json" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "level": 3,\n  oops\n}')
    result = invoke("show", str(bad))
    assert result.exit_code == 2 and "bad.json, line 3" in result.stderr
    typo = write(tmp_path, "typo.json", {"splitting_op": []})
    result = invoke("show", typo)
    assert result.exit_code == 2 and "did you mean 'splitting_ops'" in result.stderr


def test_through_main():
    """`kiln config hash` through the real entry point (an import error fails, never skips)."""
    from kiln.orchestrator.cli import main

    result = runner().invoke(main, ["config", "hash"], catch_exceptions=False)
    assert result.exit_code == 0
    assert last_line(result.stdout) == CompilationConfig().compute_hash()
