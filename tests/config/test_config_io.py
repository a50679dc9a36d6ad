"""CompilationConfig: JSON files and text, key=value overrides, property tests of both."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kiln.workers.config import (
    DEFAULT_SPLITTING_OPS,
    CompilationConfig,
    CompilationLevel,
    ConfigError,
    CUDAGraphMode,
    PassConfig,
)

M = CUDAGraphMode


def quiet(**kwargs: object) -> CompilationConfig:
    """Build a config, ignoring warnings (for tests about something else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CompilationConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_round_trip_default():
    config = CompilationConfig()
    again = CompilationConfig.from_json(config.to_json())
    assert again == config
    assert again.compute_hash() == config.compute_hash()
    assert again.to_json() == config.to_json()


def test_json_round_trip_full(tmp_path):
    config = quiet(
        level="piecewise",
        custom_ops=["none", "+rms_norm"],
        splitting_ops=[],
        compile_sizes=[1, "cudagraph_capture_sizes"],
        cudagraph_capture_sizes=[8, 4, 2, 1],
        inductor_compile_config={"max_autotune": True, "triton.cudagraphs": False},
        inductor_passes={"post_grad_custom_post_pass": "json:dumps"},
        pass_config={"enable_noop": False},
        cache_dir="/c",
    )
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    for source in (path, str(path), config.to_json(), config.to_json(indent=None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a resolved config loads without warnings
            again = CompilationConfig.from_json(source)
        assert again == config
        assert again.compute_hash() == config.compute_hash()
    assert "\n" not in config.to_json(indent=None)


def test_json_after_init_round_trips():
    config = CompilationConfig(compile_sizes=["cudagraph_capture_sizes"])
    config.init_with_cudagraph_sizes([4, 2, 1])
    again = CompilationConfig.from_json(config.to_json())
    assert again.compile_sizes == [4, 2, 1] and again.cudagraph_capture_sizes == [4, 2, 1]


def test_from_json_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="not found: .*nope.json"):
        CompilationConfig.from_json(path)


def test_from_json_invalid_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "level": 3,\n  "backend": \n}\n')
    with pytest.raises(ConfigError, match=r"bad.json, line 4"):
        CompilationConfig.from_json(str(path))
    with pytest.raises(ConfigError, match="JSON text, line 1"):
        CompilationConfig.from_json('{"level": }')
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        CompilationConfig.from_json(path)


def test_inductor_config_stored_as_json_gives_it_back():
    config = CompilationConfig(inductor_compile_config={"sizes": (1, 2), "nested": {1: "x"}})
    assert config.inductor_compile_config == {"sizes": [1, 2], "nested": {"1": "x"}}
    assert CompilationConfig.from_json(config.to_json()) == config


def test_from_json_invalid_value():
    with pytest.raises(ValidationError, match="compile_sizes"):
        CompilationConfig.from_json('{"compile_sizes": [0]}')


# ---------------------------------------------------------------------------------------------
# overrides


def test_overrides_examples():
    config = CompilationConfig().with_overrides(
        [
            "level=3",
            "pass_config.enable_noop=false",
            "compile_sizes=[1,2,4]",
            "cudagraph_mode=full",
            'custom_ops=["none","+rms_norm"]',
            "cache_dir=2024",
            "backend=aot_eager",
            "inductor_compile_config.triton.cudagraphs=true",
            "inductor_compile_config.max_autotune=false",
            "inductor_passes.post_grad_custom_post_pass=json:dumps",
        ]
    )
    assert config.level is CompilationLevel.PIECEWISE
    assert config.pass_config.enable_noop is False
    assert config.compile_sizes == [1, 2, 4]
    assert config.cudagraph_mode is M.FULL
    assert config.custom_ops == ["none", "+rms_norm"]
    assert config.cache_dir == "2024"
    assert config.backend == "aot_eager"
    assert config.inductor_compile_config == {"triton.cudagraphs": True, "max_autotune": False}
    assert config.resolved_passes["post_grad_custom_post_pass"] is json.dumps


def test_overrides_rederive_defaults():
    base = CompilationConfig()
    eager = base.with_overrides(["level=0"])
    assert eager.cudagraph_mode is M.NONE and eager.splitting_ops == []
    back = eager.with_overrides(["level=piecewise"])
    assert back == base
    assert base.level is CompilationLevel.PIECEWISE  # the original is untouched


def test_overrides_keep_given_fields():
    base = CompilationConfig(custom_ops=["all"], pass_config=PassConfig(enable_noop=False))
    config = base.with_overrides(["backend=eager"])
    assert config.custom_ops == ["all"] and config.pass_config.enable_noop is False
    assert config.with_overrides(["pass_config.enable_noop=true"]).pass_config.enable_noop is True
    assert base.with_overrides([]) == base


def test_overrides_null_and_strings():
    config = CompilationConfig(splitting_ops=["aten::mm"]).with_overrides(["splitting_ops=null"])
    assert config.splitting_ops == DEFAULT_SPLITTING_OPS
    assert CompilationConfig().with_overrides(['debug_dump_path="x y"']).debug_dump_path == "x y"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("levle=3", "unknown config key 'levle'.*did you mean 'level'"),
        ("pass_config.enable_nop=false", "'pass_config.enable_nop'.*'pass_config.enable_noop'"),
        ("cuda_graph_mode=full", "did you mean 'cudagraph_mode'"),
        ("level", "malformed override 'level'"),
        ("=3", "malformed override"),
        ("pass_config..enable_noop=1", "malformed override"),
        ("level.x=1", "'level' has no sub-keys"),
    ],
)
def test_override_errors(override, needle):
    with pytest.raises(ConfigError, match=needle):
        CompilationConfig().with_overrides([override])
    with pytest.raises(ConfigError, match=needle):
        CompilationConfig.from_cli(None, [override])


def test_override_invalid_value():
    with pytest.raises(ValidationError, match="cudagraph_mode"):
        CompilationConfig().with_overrides(["cudagraph_mode=sometimes"])


def test_from_cli(tmp_path):
    path = tmp_path / "c.json"
    data = {"level": 3, "custom_ops": ["all"], "pass_config": {"enable_noop": False}}
    path.write_text(json.dumps(data))
    overrides = ["pass_config.enable_noop=true", "use_inductor=false"]
    config = CompilationConfig.from_cli(str(path), overrides)
    assert config.custom_ops == ["all"]
    assert config.pass_config.enable_noop is True and config.use_inductor is False
    assert CompilationConfig.from_cli(None, []) == CompilationConfig()


# ---------------------------------------------------------------------------------------------
# property tests

_FIRST = "abcxyzABZ_"
IDENT = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_FIRST),
    st.text(alphabet=_FIRST + "0129", max_size=8),
)
OP_NAME = st.builds(
    lambda ns, op, overload: f"{ns}::{op}" + (f".{overload}" if overload else ""),
    IDENT,
    IDENT,
    st.none() | IDENT,
)
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False)
)


@st.composite
def custom_ops_lists(draw):
    ops = draw(st.lists(IDENT, unique=True, max_size=5))
    entries = [draw(st.sampled_from("+-")) + op for op in ops]
    switch = draw(st.sampled_from([None, "all", "none"]))
    if switch:
        entries.insert(draw(st.integers(0, len(entries))), switch)
    return entries


@st.composite
def valid_configs(draw):
    level = draw(st.sampled_from(list(CompilationLevel)))
    modes = list(M) if level == CompilationLevel.PIECEWISE else [M.NONE, M.FULL, M.FULL_DECODE_ONLY]
    kwargs = {
        "level": draw(st.sampled_from([level, int(level), level.name.lower()])),
        "backend": draw(st.sampled_from(["inductor", "eager", "aot_eager", "my_backend"])),
        "custom_ops": draw(custom_ops_lists()),
        "splitting_ops": draw(st.none() | st.lists(OP_NAME, max_size=4)),
        "use_inductor": draw(st.booleans()),
        "compile_sizes": draw(
            st.none()
            | st.lists(st.integers(1, 4096) | st.just("cudagraph_capture_sizes"), max_size=6)
        ),
        "inductor_compile_config": draw(st.dictionaries(IDENT, JSON_SCALAR, max_size=4)),
        "cudagraph_mode": draw(st.none() | st.sampled_from(modes).map(lambda m: m.name.lower())),
        "cudagraph_num_of_warmups": draw(st.integers(0, 5)),
        "cudagraph_capture_sizes": draw(st.none() | st.lists(st.integers(1, 1024), max_size=8)),
        "cudagraph_copy_inputs": draw(st.booleans()),
        "cudagraph_capture": draw(st.sampled_from(["eager", "lazy", "LAZY"])),
        "cudagraph_capture_order": draw(st.none() | st.lists(st.integers(1, 1024), max_size=4, unique=True)),
        "pass_config": {"enable_noop": draw(st.booleans())},
        "cache_dir": draw(st.text(max_size=10)),
        "debug_dump_path": draw(st.text(max_size=10)),
    }
    if draw(st.booleans()):
        kwargs["inductor_passes"] = {"post_grad_custom_post_pass": "json:dumps"}
    return kwargs


@given(valid_configs())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_json_round_trip(kwargs):
    config = quiet(**kwargs)
    text = config.to_json()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CompilationConfig.from_json(text)
    assert again == config
    assert again.compute_hash() == config.compute_hash()
    assert again.to_json() == text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert config.with_overrides([]) == config


BAD_TEXT = st.text(max_size=12)
CUSTOM_OP_ENTRY = re.compile(r"all|none|[+-][A-Za-z_][A-Za-z0-9_]*")
_ID = r"[A-Za-z_][A-Za-z0-9_]*"
# Valid splitting ops: "namespace::op[.overload]", or the dotted "namespace.op[.overload]"
# spelling that ported configs use (normalised to "::").
SPLITTING_OP = re.compile(rf"{_ID}::{_ID}(\.{_ID})?|{_ID}\.{_ID}(\.{_ID})?")


@given(st.lists(st.sampled_from(["all", "+ok", "-fine"]), max_size=1), st.one_of(
    BAD_TEXT.filter(lambda s: not CUSTOM_OP_ENTRY.fullmatch(s)),
    st.integers(),
    st.none(),
    st.floats(allow_nan=False),
))
@settings(max_examples=100, deadline=None)
def test_property_bad_custom_ops(good, bad):
    with pytest.raises(ValueError, match="custom_ops"):
        CompilationConfig(custom_ops=[*good, bad])


@given(st.one_of(
    st.integers(max_value=0),
    BAD_TEXT.filter(lambda s: s != "cudagraph_capture_sizes"),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
))
@settings(max_examples=100, deadline=None)
def test_property_bad_compile_sizes(bad):
    with pytest.raises(ValueError, match="compile_sizes"):
        CompilationConfig(compile_sizes=[4, bad])


@given(st.one_of(
    BAD_TEXT.filter(lambda s: not SPLITTING_OP.fullmatch(s)),
    st.integers(),
    st.none(),
))
@settings(max_examples=100, deadline=None)
def test_property_bad_splitting_ops(bad):
    with pytest.raises(ValueError, match="splitting_ops"):
        CompilationConfig(splitting_ops=["kiln::attention", bad])
