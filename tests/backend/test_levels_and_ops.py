"""Levels 0-2, custom-op paths, splitting, no-op elimination, the `kiln` torch.compile backend."""

from __future__ import annotations

import contextlib

import pytest
import torch

from examples.toy_llama import build
from kiln.workers.config import CompilationConfig
from kiln.workers.layers.custom_op import building_with
from kiln.workers.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from kiln.workers.runtime.kiln_model import KilnModel
from kiln.workers.torch_internals import without_torch_compile_caches


def _compare(kiln: KilnModel, ref: torch.nn.Module, sizes=(1, 3, 9)) -> None:
    for n in sizes:
        kiln.model.reset_cache()
        ref.reset_cache()
        x = kiln.model.example_inputs(n)
        torch.testing.assert_close(kiln(*x), ref(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_levels_below_piecewise_match_eager(level):
    config = CompilationConfig(level=level, backend="eager")
    with building_with(config):
        model = build()
    kiln = KilnModel(model, config)
    record = kiln.compile([1, 2, 4])
    names = [p.name for p in record.phases]
    if level == 2:
        assert names[0] == "dynamo_trace" and "compile" in names
    _compare(kiln, build())


def test_level2_traces_once_for_every_batch_size():
    calls = []

    def counting_backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    from kiln.workers.compilation.trace_once import TraceOnce

    model = build()
    fn = TraceOnce(model, counting_backend)
    for n in (4, 1, 2, 7, 33):  # 1 would recompile under Dynamo's 0/1 specialization
        model.reset_cache()
        fn(*model.example_inputs(n))
    assert len(calls) == 1 and fn.direct


def test_piecewise_without_inductor_splits_2L_plus_1():
    config = CompilationConfig(use_inductor=False)
    with building_with(config):
        model = build(layers=3)
    kiln = KilnModel(model, config)
    record = kiln.compile([2])
    assert record.pieces_total == 7 and record.pieces_splitting == 3
    assert record.inductor_compiles == 0
    _compare(kiln, build(layers=3))


@pytest.mark.parametrize(
    ("custom_ops", "use_inductor", "expect_custom"),
    [
        ([], True, {"rms_norm": False, "silu_and_mul": False, "rotary_embedding": False}),
        ([], False, {"rms_norm": True, "silu_and_mul": True, "rotary_embedding": True}),
        (["none"], False, {"rms_norm": False, "silu_and_mul": False, "rotary_embedding": False}),
        (["all"], True, {"rms_norm": True, "silu_and_mul": True, "rotary_embedding": True}),
        (["+rms_norm"], True, {"rms_norm": True, "silu_and_mul": False, "rotary_embedding": False}),
        (["all", "-silu_and_mul"], True, {"rms_norm": True, "silu_and_mul": False, "rotary_embedding": True}),
    ],
)
def test_custom_ops_pick_paths_and_are_counted(custom_ops, use_inductor, expect_custom):
    config = CompilationConfig(custom_ops=custom_ops, use_inductor=use_inductor)
    with building_with(config) as counts:
        model = build(layers=2)
    kinds = {RMSNorm: "rms_norm", SiluAndMul: "silu_and_mul", RotaryEmbedding: "rotary_embedding"}
    for module in model.modules():
        if type(module) in kinds:
            assert module.use_custom is expect_custom[kinds[type(module)]], (custom_ops, module)
    instances = {"rms_norm": 5, "silu_and_mul": 2, "rotary_embedding": 2}
    for name, n in instances.items():
        counter = counts.enabled if expect_custom[name] else counts.disabled
        assert counter[name] == n


def test_unknown_custom_op_name_is_an_error():
    from kiln.workers.compilation.backend import compile_forward

    config = CompilationConfig(custom_ops=["+rms_nrom"])
    with pytest.raises(ValueError, match="rms_nrom"):
        compile_forward(build(), config)


class _PlainAttention(torch.nn.Module):
    """A model that calls torch's SDPA directly, with no kiln ops."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):  # x: [N, T, 16]
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(a.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)).relu()


def test_split_at_torch_sdpa_in_a_plain_model(tmp_path):
    from kiln.cache import CacheStore
    from kiln.workers.compilation.backend import compile_forward
    from kiln.workers.compilation.record import CompileRecord

    model = _PlainAttention().eval()
    config = CompilationConfig(splitting_ops=["aten::scaled_dot_product_attention"], compile_sizes=[3])
    record = CompileRecord()
    progress: list[tuple[int, int]] = []
    record.progress = lambda what, done, total: progress.append((done, total))
    fn, _ = compile_forward(model, config, store=CacheStore(tmp_path / "root"), record=record)
    with torch.no_grad():
        for n in (3, 1, 5):
            x = torch.randn(n, 4, 16)
            torch.testing.assert_close(fn(x), model(x), rtol=1e-5, atol=1e-5)
    # From the model: qkv projection | SDPA | output projection. Both projections take the
    # batch of N tokens, so each compiles for the symbolic N and for compile size 3.
    assert record.pieces_total == 3 and record.pieces_splitting == 1
    assert record.inductor_compiles == 2 * 2
    # Progress counts exactly what is fetched: it ends at its total.
    assert progress[-1] == (4, 4), progress


def test_noop_elimination_removes_exactly_the_noops():
    from torch.fx.experimental.proxy_tensor import make_fx

    from kiln.workers.compilation.passes import NoOpEliminationPass

    def f(x):
        a = x.view(4, 8)          # no-op
        b = a.reshape(4, 8)       # no-op
        c = torch.ops.aten.slice.Tensor(b, 1, 0, 2**63 - 1)  # full slice: no-op
        d = c.view(8, 4)          # real view
        e = torch.ops.aten.slice.Tensor(d, 0, 0, 4)  # partial slice: real
        return e.relu()

    gm = make_fx(f)(torch.randn(4, 8))
    before = len(gm.graph.nodes)
    p = NoOpEliminationPass()
    p(gm.graph)
    gm.recompile()
    assert p.removed == 3 and len(gm.graph.nodes) == before - 3
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), f(x))


def test_kiln_is_a_torch_compile_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_ROOT", str(tmp_path / "root"))
    assert "kiln" in torch._dynamo.list_backends(), "entry point missing: pip install -e ."
    torch._dynamo.reset()
    w = torch.randn(8, 8)

    def f(x):
        return torch.relu(x @ w) + 1

    x = torch.randn(4, 8)
    torch.testing.assert_close(torch.compile(f, backend="kiln")(x), f(x))
    assert len(list((tmp_path / "root").iterdir())) == 1


@pytest.mark.parametrize("level", [2, 3])
def test_user_inductor_pass_runs_post_grad(tmp_path, monkeypatch, level):
    from kiln.cache import CacheStore
    from kiln.workers.compilation.backend import compile_forward

    module = f"kiln_user_pass_{level}"
    (tmp_path / f"{module}.py").write_text(
        "SEEN = []\n"
        "def count_mul(graph):\n"
        "    SEEN.append(sum(1 for n in graph.nodes if 'mul' in str(n.target)))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    user_pass = __import__(module)

    class M(torch.nn.Module):
        def forward(self, x):
            return (x * 3).sin()

    config = CompilationConfig(level=level, splitting_ops=[], inductor_passes={"count": f"{module}:count_mul"})
    # Level 2 compiles through Inductor's own caches: a hit from an earlier run would skip the
    # compile, and so the pass. (Level 3 compiles in a private cache directory, and its artifacts
    # are saved through those caches, so they stay on there.) Patched through torch's own
    # patch(), which restores exactly what was there.
    caches_off = without_torch_compile_caches() if level == 2 else contextlib.nullcontext()
    with caches_off:
        fn, _ = compile_forward(M(), config, store=CacheStore(tmp_path / "root"))
        x = torch.randn(5, 2)
        torch.testing.assert_close(fn(x), (x * 3).sin())
    assert user_pass.SEEN == [1], "the pass did not run exactly once on the post-grad graph"
