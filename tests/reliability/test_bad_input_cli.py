"""Bad input to the `kiln` CLI (hypothesis): warmup, config and cache subcommands.

Every invalid argument exits 1 or 2 with a message naming the argument (or the bad value), no
Python traceback, no Ray started, and nothing left under the cache root given.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.support import MODEL, SMALL, cli

pytestmark = pytest.mark.reliability

@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to build an Orchestrator or start Ray fails the test."""
    import ray

    import kiln.orchestrator.driver as driver

    def refuse(*args, **kwargs):
        raise AssertionError("an invalid command line got as far as the driver")

    monkeypatch.setattr(driver, "Orchestrator", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def assert_clear_error(result, *names: str) -> None:
    """Exit 1 or 2, a message naming one of `names`, and no traceback."""
    output = result.output
    assert result.exit_code in (1, 2), (result.exit_code, output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    assert any(name in output for name in names), (names, output)


def no_entries(root) -> bool:
    return not root.exists() or not any(p.is_dir() for p in root.iterdir())


def timed(figure, *args: str):
    start = time.perf_counter()
    result = cli(*args)
    figure.observe(time.perf_counter() - start)
    return result


# ----- kiln warmup -----------------------------------------------------------------------------


def _valid_sizes(text: str) -> bool:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        return False
    return bool(sizes) and all(s >= 1 for s in sizes)


@SMALL
@given(sizes=st.text(alphabet="0123456789,-. ax", max_size=8).filter(lambda t: not _valid_sizes(t)))
def test_warmup_bad_sizes(no_ray, tmp_path, figure, sizes):
    figure.scenario = "bad input: kiln warmup --sizes"
    root = tmp_path / "root"
    assert_clear_error(timed(figure, "warmup", MODEL, f"--sizes={sizes}", "--cache-root", str(root)), "--sizes")
    assert no_entries(root)


@SMALL
@given(tp=st.one_of(st.integers(max_value=0).map(str), st.text(alphabet="ab.-x ", max_size=4),
                    st.floats(min_value=0.1, max_value=9).map(str)))
def test_warmup_bad_tp(no_ray, tmp_path, figure, tp):
    figure.scenario = "bad input: kiln warmup --tp"
    root = tmp_path / "root"
    assert_clear_error(timed(figure, "warmup", MODEL, f"--tp={tp}", "--cache-root", str(root)), "--tp")
    assert no_entries(root)


BAD_VALUES = ["level=7", "level=abc", "cudagraph_mode=SOMETIMES", "compile_sizes=abc", "compile_sizes=[0]",
              "splitting_ops=3", "pass_config.enable_noop=maybe", 'custom_ops=["all","none"]',
              "cudagraph_num_of_warmups=-1", "level.x=1", 'inductor_passes={"p": "no.such.module.fn"}']
bad_overrides = st.one_of(
    st.sampled_from(BAD_VALUES),
    st.from_regex(r"zz[a-z_]{0,6}=[0-9a-z]{0,3}", fullmatch=True),  # unknown keys
    st.sampled_from(["level", "=3", "level.=3", ".level=3", "a..b=1"]),  # not KEY=VALUE
)


def override_names(item: str) -> tuple[str, ...]:
    """What a message about override `item` may name: the item, its key, or its first component."""
    key = item.partition("=")[0]
    return tuple(n for n in (item, key, key.split(".")[0]) if n)


@SMALL
@given(item=bad_overrides)
def test_warmup_bad_set(no_ray, tmp_path, figure, item):
    figure.scenario = "bad input: kiln warmup --set"
    root = tmp_path / "root"
    result = timed(figure, "warmup", MODEL, "--set", item, "--cache-root", str(root))
    assert_clear_error(result, *override_names(item))
    assert no_entries(root)


@SMALL
@given(item=st.one_of(st.from_regex(r"[a-z]{1,5}", fullmatch=True),  # no "="
                      st.from_regex(r"([0-9][a-z]{0,3}|[a-z]+[- .][a-z]+|)=[0-9]{1,2}", fullmatch=True)))
def test_warmup_bad_model_arg(no_ray, tmp_path, figure, item):
    figure.scenario = "bad input: kiln warmup --model-arg"
    root = tmp_path / "root"
    result = timed(figure, "warmup", MODEL, "--model-arg", item, "--cache-root", str(root))
    assert_clear_error(result, "--model-arg")
    assert no_entries(root)


_SPEC = re.compile(r"^[^:]+:[A-Za-z_][A-Za-z0-9_.]*$")


@SMALL
@given(model=st.text(alphabet="ab_./: 1-", max_size=10).filter(lambda s: not _SPEC.match(s.strip())))
def test_warmup_bad_model(no_ray, tmp_path, figure, model):
    figure.scenario = "bad input: kiln warmup MODEL"
    root = tmp_path / "root"
    # "--" so that a MODEL starting with "-" is still the argument, not an unknown option.
    result = timed(figure, "warmup", "--cache-root", str(root), "--", model)
    assert_clear_error(result, "MODEL")
    assert no_entries(root)


# ----- kiln config -----------------------------------------------------------------------------


@SMALL
@given(item=bad_overrides, command=st.sampled_from(["show", "hash"]))
def test_config_bad_set(figure, item, command):
    figure.scenario = "bad input: kiln config --set"
    assert_clear_error(timed(figure, "config", command, "--set", item), *override_names(item))


# Config file contents → a word the error must contain (the problem or the field).
BAD_FILES = {"{": "invalid JSON", "": "invalid JSON", "[1, 2]": "JSON object", '{"levle": 3}': "levle",
             '{"level": 9}': "level", '{"compile_sizes": "all"}': "compile_sizes"}


def test_config_bad_file(tmp_path, figure):
    figure.scenario = "bad input: kiln config FILE"
    path = tmp_path / "config.json"
    for text, word in BAD_FILES.items():
        path.write_text(text)
        for command in ("show", "hash"):
            assert_clear_error(timed(figure, "config", command, str(path)), word)
    assert_clear_error(timed(figure, "config", "show", str(tmp_path / "missing.json")), "missing.json")


# ----- kiln cache ------------------------------------------------------------------------------


def test_cache_commands_on_a_missing_root(tmp_path, figure):
    figure.scenario = "bad input: kiln cache --root (missing)"
    root = tmp_path / "missing"
    for args in (["ls"], ["verify"], ["prune", "--max-size", "1G"], ["explain", "0" * 32]):
        assert_clear_error(timed(figure, "cache", *args, "--root", str(root)), str(root))
    assert not root.exists(), "an inspecting command must not create the root"


# Sizes that are invalid by construction, by the documented form "bytes, or a number with K,
# M, G or T" (e.g. 500M, 2G, 1.5GiB), never by asking kiln's parser: no digit at all; a
# character no size holds (another unit, a sign, punctuation); two numbers.
INVALID_SIZES = st.one_of(
    st.text(alphabet="KMGTiB. ", max_size=6),
    st.tuples(st.integers(0, 10**6).map(str), st.sampled_from(list("xPE!,;-")),
              st.text(alphabet="0123456789KMG", max_size=3)).map("".join),
    st.integers(1, 10**6).map(lambda n: f"-{n}M"),
    st.tuples(st.integers(0, 999), st.integers(0, 999)).map(lambda t: f"{t[0]} {t[1]}G"),
)


@SMALL
@given(size=INVALID_SIZES)
def test_cache_prune_bad_max_size(tmp_path, figure, size):
    figure.scenario = "bad input: kiln cache prune --max-size"
    root = tmp_path / "root"
    root.mkdir(mode=0o700, exist_ok=True)
    assert_clear_error(timed(figure, "cache", "prune", "--root", str(root), f"--max-size={size}"), "--max-size")
    assert no_entries(root)


def test_cache_prune_good_max_size_is_accepted(tmp_path):
    """Positive control for the invalid sizes above: the documented forms are accepted."""
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    for size in ("500M", "2G", "1.5GiB", "1048576", "64k"):
        result = cli("cache", "prune", "--root", str(root), f"--max-size={size}")
        assert result.exit_code == 0, (size, result.output)


@SMALL
@given(days=st.one_of(st.floats(max_value=-0.001).map(str), st.text(alphabet="abx-,", min_size=1, max_size=4)))
def test_cache_prune_bad_older_than(tmp_path, figure, days):
    figure.scenario = "bad input: kiln cache prune --older-than"
    root = tmp_path / "root"
    root.mkdir(mode=0o700, exist_ok=True)
    assert_clear_error(timed(figure, "cache", "prune", "--root", str(root), f"--older-than={days}"), "--older-than")


@SMALL
@given(key=st.text(alphabet="0123456789abcdefxyz./", min_size=1, max_size=34))
def test_cache_explain_unknown_key(tmp_path, figure, key):
    figure.scenario = "bad input: kiln cache explain KEY"
    root = tmp_path / "root"
    root.mkdir(mode=0o700, exist_ok=True)
    assert_clear_error(timed(figure, "cache", "explain", "--root", str(root), "--", key), repr(key))
    assert no_entries(root)
