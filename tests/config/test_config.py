"""CompilationConfig: validation and resolution of each field, sizes, custom ops, PassConfig."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from kiln.workers.config import (
    DEFAULT_SPLITTING_OPS,
    CompilationConfig,
    CompilationLevel,
    CUDAGraphMode,
    PassConfig,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_SIZES = [1, 2, 4] + list(range(8, 513, 8))

M = CUDAGraphMode


def quiet(**kwargs: object) -> CompilationConfig:
    """Build a config, ignoring warnings (for tests about something else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CompilationConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Sizes


def brute_force_padding(sizes: list[int]) -> list[int]:
    largest = max(sizes, default=0)
    return [0] + [min(s for s in sizes if s >= b) for b in range(1, largest + 1)]


@pytest.mark.parametrize(
    "sizes",
    [
        VLLM_SIZES,
        [1],
        [7],
        [3, 1, 2],
        [5, 5, 1, 1, 7],
        [16, 8, 8, 4],
        list(range(1, 11)),
        [512, 1],
        [],
    ],
)
def test_init_with_cudagraph_sizes_padding(sizes):
    config = CompilationConfig()
    config.init_with_cudagraph_sizes(sizes)
    unique_desc = sorted(set(sizes), reverse=True)
    assert config.cudagraph_capture_sizes == unique_desc
    assert config.max_capture_size == (max(sizes) if sizes else 0)
    assert config.bs_to_padded_graph_size == brute_force_padding(sizes)
    assert len(config.bs_to_padded_graph_size) == config.max_capture_size + 1


def test_vllm_sizes_specifics():
    config = CompilationConfig()
    config.init_with_cudagraph_sizes(VLLM_SIZES)
    table = config.bs_to_padded_graph_size
    assert config.max_capture_size == 512
    assert len(config.cudagraph_capture_sizes) == 67
    assert (table[0], table[1], table[2], table[3], table[4], table[5]) == (0, 1, 2, 4, 4, 8)
    assert (table[9], table[16], table[17], table[511], table[512]) == (16, 16, 24, 512, 512)


def test_sizes_before_init():
    config = CompilationConfig()
    assert config.max_capture_size == 0
    assert config.bs_to_padded_graph_size == []


def test_own_capture_sizes_win_and_dedupe_logs(caplog):
    config = CompilationConfig(cudagraph_capture_sizes=[4, 2, 4, 1, 2])
    with caplog.at_level(logging.INFO, logger="kiln.workers.config"):
        config.init_with_cudagraph_sizes(VLLM_SIZES)
    assert config.cudagraph_capture_sizes == [4, 2, 1]
    assert config.max_capture_size == 4
    assert config.bs_to_padded_graph_size == [0, 1, 2, 4, 4]
    assert "duplicate" in caplog.text and "[2, 4]" in caplog.text


def test_compile_sizes_expansion():
    config = CompilationConfig(compile_sizes=[1000, "cudagraph_capture_sizes", 3, 1])
    config.init_with_cudagraph_sizes([8, 4, 2, 1])
    assert config.compile_sizes == [1000, 8, 4, 3, 2, 1]
    config.init_with_cudagraph_sizes([8, 4, 2, 1])  # idempotent
    assert config.compile_sizes == [1000, 8, 4, 3, 2, 1]
    assert config.cudagraph_capture_sizes == [8, 4, 2, 1]


def test_compile_sizes_none_becomes_empty():
    config = CompilationConfig()
    config.init_with_cudagraph_sizes([1, 2])
    assert config.compile_sizes == []


def test_padding_computed_without_cudagraphs():
    config = CompilationConfig(cudagraph_mode="none")
    config.init_with_cudagraph_sizes([1, 2, 4])
    assert config.bs_to_padded_graph_size == [0, 1, 2, 4, 4]


def test_bad_default_sizes():
    with pytest.raises(ValueError, match="capture size 0"):
        CompilationConfig().init_with_cudagraph_sizes([1, 0])


class CountingInt(int):
    """An int that counts the order comparisons made on it (work, measured without a clock)."""

    comparisons = 0

    def _count(op):
        def compare(self, other):
            CountingInt.comparisons += 1
            return op(int(self), int(other))
        return compare

    __lt__, __le__, __gt__, __ge__ = (_count(int.__lt__), _count(int.__le__), _count(int.__gt__),
                                      _count(int.__ge__))


def test_init_does_linear_work_for_512_sizes():
    """The padding table is built in one pass (about n log n + max comparisons), not by a
    search per batch size (n * max / 2 = 131072 here)."""
    config = CompilationConfig()
    CountingInt.comparisons = 0
    config.init_with_cudagraph_sizes([CountingInt(n) for n in range(1, 513)])
    assert 0 < CountingInt.comparisons < 20_000, CountingInt.comparisons
    assert config.bs_to_padded_graph_size == list(range(0, 513))


@given(st.lists(st.integers(1, 300), max_size=40))
@settings(max_examples=60, deadline=None)
def test_padding_property(sizes):
    config = CompilationConfig()
    config.init_with_cudagraph_sizes(sizes)
    assert config.bs_to_padded_graph_size == brute_force_padding(sizes)


# ---------------------------------------------------------------------------------------------
# CUDAGraphMode and CompilationLevel

MODE_TABLE = {
    # mode: (decode, mixed, separate, requires_piecewise, max, has_full, has_piecewise)
    M.NONE: (M.NONE, M.NONE, False, False, M.NONE, False, False),
    M.PIECEWISE: (M.PIECEWISE, M.PIECEWISE, False, True, M.PIECEWISE, False, True),
    M.FULL: (M.FULL, M.FULL, False, False, M.FULL, True, False),
    M.FULL_DECODE_ONLY: (M.FULL, M.NONE, True, False, M.FULL, True, False),
    M.FULL_AND_PIECEWISE: (M.FULL, M.PIECEWISE, True, True, M.FULL, True, True),
}


@pytest.mark.parametrize("mode", list(M))
def test_mode_methods(mode):
    decode, mixed, separate, piecewise, maximum, full, has_piecewise = MODE_TABLE[mode]
    assert mode.decode_mode() is decode
    assert mode.mixed_mode() is mixed
    assert mode.separate_routine() is separate
    assert mode.requires_piecewise_compilation() is piecewise
    assert mode.max_cudagraph_mode() is maximum
    assert mode.has_full_cudagraphs() is full
    assert mode.has_piecewise_cudagraphs() is has_piecewise


@pytest.mark.parametrize(
    "text, mode",
    [
        ("full_and_piecewise", M.FULL_AND_PIECEWISE),
        ("FULL_DECODE_ONLY", M.FULL_DECODE_ONLY),
        ("Full", M.FULL),
        (" piecewise ", M.PIECEWISE),
        ("none", M.NONE),
        (M.FULL, M.FULL),
    ],
)
def test_mode_names_any_case(text, mode):
    assert M.parse(text) is mode
    assert CompilationConfig(cudagraph_mode=text).cudagraph_mode is mode


@pytest.mark.parametrize("bad", ["fullish", "", "full-and-piecewise", 2, (2, 1), 1.0, True])
def test_mode_bad_names(bad):
    with pytest.raises(ValidationError, match="cudagraph_mode") as info:
        CompilationConfig(cudagraph_mode=bad)
    assert "FULL_AND_PIECEWISE" in str(info.value)  # lists the valid names


def test_mode_serializes_to_name():
    config = CompilationConfig(cudagraph_mode="full_decode_only")
    assert json.loads(config.to_json())["cudagraph_mode"] == "FULL_DECODE_ONLY"


@pytest.mark.parametrize(
    "value, level",
    [
        (0, CompilationLevel.NO_COMPILATION),
        (3, CompilationLevel.PIECEWISE),
        ("piecewise", CompilationLevel.PIECEWISE),
        ("Dynamo_Once", CompilationLevel.DYNAMO_ONCE),
        ("1", CompilationLevel.DYNAMO_AS_IS),
        (CompilationLevel.DYNAMO_ONCE, CompilationLevel.DYNAMO_ONCE),
    ],
)
def test_level_parsing(value, level):
    assert CompilationConfig(level=value).level is level


@pytest.mark.parametrize("bad", [4, -1, "fast", True, 3.0, None, ""])
def test_level_bad(bad):
    with pytest.raises(ValidationError, match="level") as info:
        CompilationConfig(level=bad)
    assert "PIECEWISE" in str(info.value)


def test_defaults_per_level():
    assert CompilationConfig().cudagraph_mode is M.FULL_AND_PIECEWISE
    for level in (0, 1, 2):
        config = CompilationConfig(level=level)
        assert config.cudagraph_mode is M.NONE
        assert config.splitting_ops == []


def test_piecewise_mode_needs_level_3():
    for mode in ("piecewise", "full_and_piecewise"):
        with pytest.raises(ValidationError, match="cudagraph_mode.*level=3"):
            CompilationConfig(level=1, cudagraph_mode=mode)
    assert CompilationConfig(level=0, cudagraph_mode="full").cudagraph_mode is M.FULL
    config = CompilationConfig(level=2, cudagraph_mode="full_decode_only")
    assert config.cudagraph_mode is M.FULL_DECODE_ONLY


# ---------------------------------------------------------------------------------------------
# custom ops


@pytest.mark.parametrize(
    "ops",
    [
        [],
        ["all"],
        ["none"],
        ["none", "+rms_norm"],
        ["all", "-silu_and_mul", "+rms_norm"],
        ["+a", "+a"],
    ],
)
def test_custom_ops_valid(ops):
    assert CompilationConfig(custom_ops=ops).custom_ops == ops


@pytest.mark.parametrize(
    "ops, needle",
    [
        (["all", "none"], "at most one"),
        (["none", "all"], "at most one"),
        (["all", "all"], "at most one"),
        (["rms_norm"], "'rms_norm'"),
        (["+"], "'+'"),
        (["+1x"], "'+1x'"),
        (["++x"], "'++x'"),
        (["+x-y"], "'+x-y'"),
        (["ALL"], "'ALL'"),
        ([""], "''"),
        (["+ x"], "'+ x'"),
        ([3], "3"),
        (["+rms_norm", "-rms_norm"], "'rms_norm' is both"),
        ("all", "expected a list"),
        ({"all"}, "expected a list"),
    ],
)
def test_custom_ops_errors(ops, needle):
    with pytest.raises(ValidationError, match="custom_ops") as info:
        CompilationConfig(custom_ops=ops)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, enabled",
    [
        ({"level": 0}, True),
        ({"level": 1}, False),
        ({"level": 1, "backend": "eager"}, True),
        ({"level": 2}, False),
        ({"level": 2, "backend": "aot_eager"}, True),
        ({"level": 3}, False),
        ({"level": 3, "backend": "eager"}, False),  # backend is ignored at level 3
        ({"level": 3, "use_inductor": False}, True),
        ({"level": 0, "use_inductor": True}, True),
    ],
)
def test_custom_op_default(kwargs, enabled):
    config = CompilationConfig(**kwargs)
    assert config.custom_op_enabled("rms_norm") is enabled
    assert config.uses_inductor() is not enabled


def test_custom_op_explicit():
    config = CompilationConfig(custom_ops=["none", "+rms_norm"], level=0)
    assert config.custom_op_enabled("rms_norm") is True
    assert config.custom_op_enabled("silu_and_mul") is False
    config = CompilationConfig(custom_ops=["all", "-silu_and_mul"])
    assert config.custom_op_enabled("silu_and_mul") is False
    assert config.custom_op_enabled("rms_norm") is True
    config = CompilationConfig(custom_ops=["+rms_norm"])  # level 3 with Inductor
    assert config.custom_op_enabled("rms_norm") is True
    assert config.custom_op_enabled("silu_and_mul") is False


# ---------------------------------------------------------------------------------------------
# deprecated flags


def test_use_cudagraph_false():
    with pytest.warns(DeprecationWarning, match="use_cudagraph"):
        config = CompilationConfig(use_cudagraph=False)
    assert config.cudagraph_mode is M.NONE
    assert config.use_cudagraph is False  # kept as given, folded into cudagraph_mode
    assert "use_cudagraph" not in json.loads(config.to_json())


def test_deprecated_flags_read_as_the_seed_does():
    # A default config reads use_cudagraph=True (code that checks it must not think graphs are
    # off) and full_cuda_graph=False, without any warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = CompilationConfig()
    assert config.use_cudagraph is True and config.full_cuda_graph is False


@pytest.mark.parametrize("flags", [{"use_cudagraph": True}, {"full_cuda_graph": False},
                                   {"use_cudagraph": True, "full_cuda_graph": False}])
def test_flags_that_ask_for_nothing_are_accepted_beside_a_mode(flags):
    with pytest.warns(DeprecationWarning):
        config = CompilationConfig(cudagraph_mode="piecewise", **flags)
    assert config.cudagraph_mode is M.PIECEWISE


def test_use_cudagraph_true_keeps_default():
    with pytest.warns(DeprecationWarning, match="use_cudagraph"):
        config = CompilationConfig(use_cudagraph=True)
    assert config.cudagraph_mode is M.FULL_AND_PIECEWISE
    with pytest.warns(DeprecationWarning):
        assert CompilationConfig(level=0, use_cudagraph=True).cudagraph_mode is M.NONE


def test_full_cuda_graph():
    with pytest.warns(DeprecationWarning, match="full_cuda_graph"):
        config = CompilationConfig(full_cuda_graph=True)
    assert config.cudagraph_mode is M.FULL
    assert config.full_cuda_graph is True  # kept as given, folded into cudagraph_mode
    with pytest.warns(DeprecationWarning):
        assert CompilationConfig(full_cuda_graph=False).cudagraph_mode is M.FULL_AND_PIECEWISE
    with pytest.warns(DeprecationWarning):
        assert CompilationConfig(level=0, full_cuda_graph=True).cudagraph_mode is M.FULL


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"use_cudagraph": False, "cudagraph_mode": "full"}, "use_cudagraph"),
        ({"full_cuda_graph": True, "cudagraph_mode": "full"}, "full_cuda_graph"),
        ({"use_cudagraph": False, "full_cuda_graph": True}, "contradict"),
    ],
)
def test_deprecated_flag_conflicts(kwargs, needle):
    with pytest.raises(ValidationError, match=needle):
        CompilationConfig(**kwargs)


def test_deprecated_flags_round_trip_silently():
    with pytest.warns(DeprecationWarning):
        config = CompilationConfig(use_cudagraph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CompilationConfig.from_json(config.to_json())
    assert again == config


# ---------------------------------------------------------------------------------------------
# splitting ops


def test_default_splitting_ops():
    # attention: kiln's op (its models) and torch's SDPA (unmodified models)
    assert DEFAULT_SPLITTING_OPS == ["kiln::attention", "aten::scaled_dot_product_attention"]
    config = CompilationConfig()
    assert config.splitting_ops == DEFAULT_SPLITTING_OPS
    assert config.splitting_ops is not DEFAULT_SPLITTING_OPS
    assert CompilationConfig(level=1, splitting_ops=["aten::mm"]).splitting_ops == ["aten::mm"]


@pytest.mark.parametrize("mode", [None, "piecewise", "full_and_piecewise"])
def test_empty_splitting_ops_piecewise_becomes_full(mode):
    with pytest.warns(UserWarning, match="splitting_ops is empty"):
        config = CompilationConfig(splitting_ops=[], cudagraph_mode=mode)
    assert config.cudagraph_mode is M.FULL
    assert config.splitting_ops == []


@pytest.mark.parametrize("mode", ["none", "full", "full_decode_only"])
def test_empty_splitting_ops_other_modes_unchanged(mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = CompilationConfig(splitting_ops=[], cudagraph_mode=mode)
    assert config.cudagraph_mode is M.parse(mode)


def test_set_splitting_ops_idempotent():
    config = CompilationConfig()
    config.set_splitting_ops_for_piecewise()
    assert config.splitting_ops == DEFAULT_SPLITTING_OPS
    assert config.cudagraph_mode is M.FULL_AND_PIECEWISE


@pytest.mark.parametrize(
    "op", ["aten::scaled_dot_product_attention", "kiln::attention.default", "_ns::_op.out2"]
)
def test_splitting_ops_valid(op):
    assert CompilationConfig(splitting_ops=[op]).splitting_ops == [op]


@pytest.mark.parametrize(
    "op",
    ["attention", "kiln:attention", "kiln::", "::x", "kiln::attention.", "a::b.c.d", "a b::c",
     "1a::b", "kiln::attention ", 3, None],
)
def test_splitting_ops_invalid(op):
    with pytest.raises(ValidationError, match="splitting_ops") as info:
        CompilationConfig(splitting_ops=["aten::mm", op])
    assert repr(op) in str(info.value)


# ---------------------------------------------------------------------------------------------
# other fields


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"compile_sizes": [0]}, "compile_sizes"),
        ({"compile_sizes": [-4]}, "compile_sizes"),
        ({"compile_sizes": ["cudagraph_sizes"]}, "compile_sizes"),
        ({"compile_sizes": [True]}, "compile_sizes"),
        ({"compile_sizes": [2.0]}, "compile_sizes"),
        ({"cudagraph_capture_sizes": [0]}, "cudagraph_capture_sizes"),
        ({"cudagraph_capture_sizes": ["cudagraph_capture_sizes"]}, "cudagraph_capture_sizes"),
        ({"cudagraph_capture": "later"}, "cudagraph_capture"),
        ({"cudagraph_capture": True}, "cudagraph_capture"),
        ({"cudagraph_capture_order": [0]}, "cudagraph_capture_order"),
        ({"cudagraph_capture_order": [2, 2]}, "cudagraph_capture_order"),
        ({"cudagraph_capture_order": 4}, "cudagraph_capture_order"),
        ({"cudagraph_num_of_warmups": -1}, "cudagraph_num_of_warmups"),
        ({"cudagraph_num_of_warmups": True}, "cudagraph_num_of_warmups"),
        ({"backend": ""}, "backend"),
        ({"backend": "  "}, "backend"),
        ({"use_inductor": "maybe"}, "use_inductor"),
        ({"inductor_compile_config": {"x": object()}}, "inductor_compile_config.x"),
        ({"inductor_compile_config": {"x": float("nan")}}, "inductor_compile_config.x"),
        ({"inductor_passes": {"p": 42}}, "inductor_passes.p"),
        ({"levle": 3}, "levle"),
        ({"pass_config": {"enable_nop": False}}, "enable_nop"),
    ],
)
def test_field_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as info:
        CompilationConfig(**kwargs)
    assert field in str(info.value)


def test_lazy_capture_fields():
    config = CompilationConfig()
    assert config.cudagraph_capture == "eager" and config.cudagraph_capture_order is None
    config = CompilationConfig(cudagraph_capture="LAZY", cudagraph_capture_sizes=[1, 2, 4, 8])
    config.init_with_cudagraph_sizes([])
    assert config.cudagraph_capture == "lazy"
    assert config.lazy_capture_order() == [1, 2, 4, 8]
    config = CompilationConfig(cudagraph_capture="lazy", cudagraph_capture_sizes=[1, 2, 4, 8],
                               cudagraph_capture_order=[8, 2])
    config.init_with_cudagraph_sizes([])
    assert config.lazy_capture_order() == [8, 2, 1, 4]
    assert CompilationConfig.from_json(config.to_json()).cudagraph_capture_order == [8, 2]
    bad = CompilationConfig(cudagraph_capture_sizes=[1, 2], cudagraph_capture_order=[16])
    with pytest.raises(ValueError, match=r"cudagraph_capture_order: \[16\] are not capture sizes"):
        bad.init_with_cudagraph_sizes([])


def test_unknown_field_suggests():
    with pytest.raises(ValidationError, match="did you mean 'level'"):
        CompilationConfig(levle=3)
    with pytest.raises(ValidationError, match="did you mean 'enable_noop'"):
        CompilationConfig(pass_config={"enable_nop": False})


def test_paths_accept_pathlike(tmp_path):
    config = CompilationConfig(cache_dir=tmp_path, debug_dump_path=tmp_path / "d")
    assert config.cache_dir == str(tmp_path)
    assert config.debug_dump_path == str(tmp_path / "d")


def test_every_field_documented():
    for model in (CompilationConfig, PassConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_config_holds_no_runtime_state():
    # Timings, cache directories, traced files and counters belong to the objects that own them.
    config = CompilationConfig()
    for name in ("local_cache_dir", "set_local_cache_dir", "compilation_time", "add_compilation_time",
                 "traced_files", "record_custom_op", "enabled_custom_ops", "disabled_custom_ops"):
        assert not hasattr(config, name), name
    dumped = config.model_dump()
    assert "max_capture_size" not in dumped and "bs_to_padded_graph_size" not in dumped
    assert config == CompilationConfig()


def test_dotted_splitting_op_spelling_is_accepted():
    dotted = CompilationConfig(splitting_ops=["silly.attention", "silly.attention.default"])
    assert dotted.splitting_ops == ["silly::attention", "silly::attention.default"]
    assert dotted.compute_hash() == CompilationConfig(
        splitting_ops=["silly::attention", "silly::attention.default"]).compute_hash()
    with pytest.raises(ValueError, match="splitting_ops"):
        CompilationConfig(splitting_ops=["silly"])


def test_no_torch_import(subprocess_env):
    code = (
        "import sys, kiln.workers.config, kiln.orchestrator.cli_config;"
        "bad = [m for m in ('torch', 'ray') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=subprocess_env())


# ---------------------------------------------------------------------------------------------
# PassConfig

UNIMPLEMENTED = [
    "enable_fusion",
    "enable_attn_fusion",
    "enable_sequence_parallelism",
    "enable_async_tp",
    "enable_fi_allreduce_fusion",
]


@pytest.mark.parametrize("flag", UNIMPLEMENTED)
def test_unimplemented_passes(flag):
    message = f"pass_config.{flag}: not implemented yet in kiln"
    with pytest.raises(ValidationError, match=message):
        PassConfig(**{flag: True})
    with pytest.raises(ValidationError, match=message):
        CompilationConfig(pass_config={flag: True})
    assert getattr(PassConfig(**{flag: False}), flag) is False


def test_pass_config_uuid():
    assert PassConfig().uuid() == PassConfig().uuid()
    assert PassConfig().uuid() != PassConfig(enable_noop=False).uuid()
    assert len(PassConfig().uuid()) == 32
