"""CompilationConfig: inductor passes (resolution, naming, identity) and the config hash."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.workers.config import CompilationConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
VLLM_SIZES = [1, 2, 4] + list(range(8, 513, 8))


def quiet(**kwargs: object) -> CompilationConfig:
    """Build a config, ignoring warnings (for tests about something else)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CompilationConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# inductor passes

PASS_SOURCE = """
def my_pass(graph):
    return graph

class PassClass:
    def __call__(self, graph):
        return graph

    @classmethod
    def make(cls, graph):
        return graph

INSTANCE = PassClass()

class WithUuid:
    def __call__(self, graph):
        return graph

    def uuid(self):
        return "v1"

WITH_UUID = WithUuid()
NOT_CALLABLE = 3
"""


def test_passes_resolve(pass_modules):
    mod = pass_modules(PASS_SOURCE)
    config = CompilationConfig(
        inductor_passes={
            "a": f"{mod}:my_pass",
            "b": f"{mod}.my_pass",
            "c": f"{mod}:PassClass.make",
            "d": f"{mod}.PassClass.make",
            "e": f"{mod}:INSTANCE",
        }
    )
    module = sys.modules[mod]
    resolved = config.resolved_passes
    assert resolved["a"] is module.my_pass and resolved["b"] is module.my_pass
    assert resolved["c"] == module.PassClass.make and resolved["d"] == module.PassClass.make
    assert resolved["e"] is module.INSTANCE


def test_passes_callables(pass_modules):
    mod = pass_modules(PASS_SOURCE)
    module = __import__(mod)
    config = CompilationConfig(inductor_passes={"p": module.my_pass, "q": module.INSTANCE})
    assert config.resolved_passes == {"p": module.my_pass, "q": module.INSTANCE}
    dumped = json.loads(config.to_json())["inductor_passes"]
    assert dumped == {"p": f"{mod}:my_pass", "q": f"{mod}:INSTANCE"}
    again = CompilationConfig.from_json(config.to_json())
    assert again.resolved_passes == config.resolved_passes
    assert again.compute_hash() == config.compute_hash()
    assert again == config


@pytest.mark.parametrize(
    "target, needle",
    [
        ("kiln_no_such_module_xyz:f", "no module named 'kiln_no_such_module_xyz'"),
        ("{mod}:missing", "has no attribute 'missing'"),
        ("{mod}.missing", "has no attribute 'missing'"),
        ("{mod}:NOT_CALLABLE", "not a callable"),
        ("not_qualified", "not a qualified name"),
        ("a:b:c", "not a qualified name"),
        ("", "not a qualified name"),
    ],
)
def test_passes_unresolvable(pass_modules, target, needle):
    mod = pass_modules(PASS_SOURCE)
    target = target.format(mod=mod)
    with pytest.raises(ValidationError) as info:
        CompilationConfig(inductor_passes={"post_grad_custom_post_pass": target})
    text = str(info.value)
    assert "inductor_passes.post_grad_custom_post_pass" in text
    assert repr(target) in text and needle in text


def test_pass_module_import_error_is_reported(pass_modules):
    mod = pass_modules("import kiln_missing_dependency_xyz\n\ndef f(g):\n    return g\n")
    needle = "inductor_passes.p: cannot resolve.*ModuleNotFoundError"
    with pytest.raises(ValidationError, match=needle):
        CompilationConfig(inductor_passes={"p": f"{mod}:f"})


def test_pass_conflicts_with_inductor_config():
    needle = "inductor_passes.p: also set in inductor_compile_config"
    with pytest.raises(ValidationError, match=needle):
        CompilationConfig(inductor_passes={"p": "json:dumps"}, inductor_compile_config={"p": None})


def test_pass_hash_follows_source(pass_modules):
    body = "def f(graph):\n    return graph\n"
    other = "def f(graph):\n    graph.lint()\n    return graph\n"
    a, b, c = pass_modules(body), pass_modules(body), pass_modules(other)

    def config_hash(mod):
        return CompilationConfig(inductor_passes={"p": f"{mod}:f"}).compute_hash()

    assert config_hash(a) == config_hash(b)  # same source, other module: same code
    assert config_hash(a) != config_hash(c)
    assert config_hash(a) != CompilationConfig().compute_hash()
    factors = CompilationConfig(inductor_passes={"p": f"{a}:f"}).compile_factors()
    assert factors["inductor_passes"]["p"].startswith("source:")


def test_pass_hash_uses_uuid(pass_modules):
    mod = pass_modules(PASS_SOURCE)
    config = CompilationConfig(inductor_passes={"p": f"{mod}:WITH_UUID"})
    assert config.compile_factors()["inductor_passes"] == {"p": "uuid:v1"}
    v1 = config.compute_hash()
    sys.modules[mod].WITH_UUID.uuid = lambda: "v2"  # same source, new identity
    assert config.compute_hash() != v1
    sys.modules[mod].WITH_UUID.uuid = lambda: None
    with pytest.raises(ValueError, match="uuid\\(\\) returned None"):
        config.compute_hash()


def test_pass_class_and_instance_hash_by_class_source(pass_modules):
    mod = pass_modules(PASS_SOURCE)
    by_class = CompilationConfig(inductor_passes={"p": f"{mod}:PassClass"})
    by_instance = CompilationConfig(inductor_passes={"p": f"{mod}:INSTANCE"})
    assert by_class.compute_hash() == by_instance.compute_hash()


def test_pass_without_source():
    namespace: dict = {}
    exec(compile("def generated(graph):\n    return graph\n", "<generated>", "exec"), namespace)
    config = CompilationConfig(inductor_passes={"gen": namespace["generated"]})
    needle = "cannot hash inductor pass 'gen': no source; give it a uuid"
    with pytest.raises(ValueError, match=needle):
        config.compute_hash()
    partial = CompilationConfig(inductor_passes={"part": functools.partial(json.dumps, indent=2)})
    with pytest.raises(ValueError, match="cannot hash inductor pass 'part'"):
        partial.compute_hash()


def test_unnamable_pass_fails_at_dump():
    def local_pass(graph):
        return graph

    config = CompilationConfig(inductor_passes={"local": local_pass})
    assert len(config.compute_hash()) == 32  # has source, so it hashes
    with pytest.raises(ValueError, match="inductor_passes.local: cannot write"):
        config.to_json()


# ---------------------------------------------------------------------------------------------
# hash

HASH_NEUTRAL = [
    {"cache_dir": "/somewhere/else"},
    {"debug_dump_path": "/tmp/dump"},
    {"cudagraph_capture_sizes": [1, 2, 4]},
    {"compile_sizes": [1, 2, "cudagraph_capture_sizes"]},
    {"cudagraph_mode": "full"},
    {"cudagraph_mode": "none"},
    {"cudagraph_num_of_warmups": 5},
    {"cudagraph_copy_inputs": True},
    {"cudagraph_capture": "lazy"},
    {"cudagraph_capture_order": [8, 1]},
    {"use_cudagraph": False},
    {"full_cuda_graph": True},
]

HASH_RELEVANT = [
    {"level": 2},
    {"level": 1},
    {"level": 0},
    {"backend": "eager"},
    {"custom_ops": ["+rms_norm"]},
    {"custom_ops": ["none"]},
    {"splitting_ops": ["kiln::attention"]},  # the default before SDPA joined it: caches keep apart
    {"splitting_ops": ["aten::scaled_dot_product_attention"]},
    {"splitting_ops": ["kiln::attention", "aten::mm"]},
    {"use_inductor": False},
    {"inductor_compile_config": {"max_autotune": True}},
    {"inductor_compile_config": {"max_autotune": False}},
    {"pass_config": {"enable_noop": False}},
    {"inductor_passes": {"post_grad_custom_post_pass": "json:dumps"}},
    {"inductor_passes": {"post_grad_custom_pre_pass": "json:dumps"}},
    {"inductor_passes": {"post_grad_custom_post_pass": "json:loads"}},
]


@pytest.mark.parametrize("kwargs", HASH_NEUTRAL, ids=lambda kw: next(iter(kw)))
def test_hash_ignores(kwargs):
    assert quiet(**kwargs).compute_hash() == CompilationConfig().compute_hash()


def test_hash_ignores_runtime_sizes():
    config = CompilationConfig(compile_sizes=["cudagraph_capture_sizes"])
    before = config.compute_hash()
    config.init_with_cudagraph_sizes(VLLM_SIZES)
    assert config.compute_hash() == before


def test_hash_changes_with_each_relevant_field():
    hashes = [quiet(**kwargs).compute_hash() for kwargs in HASH_RELEVANT]
    hashes.append(CompilationConfig().compute_hash())
    assert len(set(hashes)) == len(hashes)


def test_hash_independent_of_dict_order():
    a = CompilationConfig(inductor_compile_config={"a": 1, "b": {"x": 1, "y": 2}})
    b = CompilationConfig(inductor_compile_config={"b": {"y": 2, "x": 1}, "a": 1})
    assert a.compute_hash() == b.compute_hash()


def test_compile_factors_content():
    factors = CompilationConfig().compile_factors()
    assert set(factors) == {
        "level",
        "backend",
        "custom_ops",
        "splitting_ops",
        "use_inductor",
        "inductor_compile_config",
        "pass_config",
        "inductor_passes",
    }
    assert factors["splitting_ops"] == ["kiln::attention", "aten::scaled_dot_product_attention"]
    json.dumps(factors)  # plain JSON


HASH_SCRIPT = """
from kiln.workers.config import CompilationConfig
config = CompilationConfig(
    custom_ops=["none", "+rms_norm", "+silu_and_mul", "-gelu"],
    splitting_ops=["kiln::attention", "aten::mm.default"],
    inductor_compile_config={f"k{i}": i for i in range(40)} | {"nested": {"b": [1, 2], "a": None}},
    inductor_passes={
        "post_grad_custom_post_pass": "json:dumps",
        "joint_custom_pre_pass": "json.loads",
    },
)
print(config.compute_hash())
"""


def test_hash_identical_across_processes(subprocess_env):
    outputs = set()
    for seed in ("0", "4242"):
        result = subprocess.run(
            [sys.executable, "-c", HASH_SCRIPT],
            env=subprocess_env(PYTHONHASHSEED=seed),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.add(result.stdout.strip())
    assert len(outputs) == 1
    namespace: dict = {}
    exec(HASH_SCRIPT.replace("print(config.compute_hash())", "h = config.compute_hash()"), namespace)
    assert outputs == {namespace["h"]}
