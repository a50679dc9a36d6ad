"""What makes Inductor's autotuning travel with an artifact, tested where a CPU can test it.

On CUDA kiln runs every fresh artifact once before packing it, so that Triton's autotuner saves
its choices into the artifact (tests/cuda/test_warm_autotune.py checks the whole effect on a
GPU). Here: which inputs a piece writes to (that run must never touch a real buffer), that the
run itself keeps a prefilled buffer intact end to end, the counter of autotuning benchmarks, and
where loaded kernels look for their saved choices.
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kiln.workers import torch_internals
from kiln.workers.compilation.mutation import mutated_inputs, protect_inputs
from kiln.workers.compilation.piecewise_backend import PiecewiseBackend
from kiln.workers.config import CompilationConfig


def dynamo_graph(fn, *args):
    """The FX graph Dynamo hands a backend for fn(*args), and its placeholders' names."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    (gm,) = graphs
    return gm, [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def written(fn, *args) -> set[str]:
    gm, names = dynamo_graph(fn, *args)
    return {names[i] for i in mutated_inputs(gm)}


X, W = torch.randn(4, 8), torch.randn(8, 8)


def fresh_cache() -> torch.Tensor:
    return torch.zeros(6, 8)


def test_writes_into_inputs_are_found_through_views():
    idx = torch.tensor([1, 2, 3, 4])
    assert written(lambda x, c, i: c.index_copy_(0, i, x), X, fresh_cache(), idx) == {"l_c_"}

    def setitem(x, c):
        c[:4] = x
        return x + 1

    def through_view(x, c):
        c.view(-1)[:32].copy_(x.view(-1))
        return x * 2

    def through_transpose(x, c):
        c.transpose(0, 1)[0] += x[0, :6]
        return x

    for fn in (setitem, through_view, through_transpose):
        assert written(fn, X, fresh_cache()) == {"l_c_"}, fn.__name__


def test_writes_into_intermediates_are_not_writes_into_inputs():
    def out_of_place(x, w):
        y = F.linear(x, w)
        y += 1
        return F.silu(y).add_(2)

    def conversions(x, w):
        return torch.softmax(x.float(), -1) * w.t()[:4]

    assert written(out_of_place, X, W) == set()
    assert written(conversions, X, W) == set()


def test_a_conversion_that_may_return_its_input_counts_as_the_input():
    def convert_then_write(x, c):
        c.float().mul_(2)  # float() of a float tensor is the tensor itself
        return x

    assert written(convert_then_write, X, fresh_cache()) == {"l_c_"}


def test_protect_inputs_replaces_only_written_real_tensors():
    real, other, fresh = torch.ones(3, 2).t(), torch.ones(2), torch.ones(2)
    out = protect_inputs([real, other, fresh, 7], [0, 2], {id(real), id(other)})
    assert out[1] is other and out[2] is fresh and out[3] == 7  # not written / not real state
    assert out[0] is not real and out[0].stride() == real.stride() and out[0].abs().sum() == 0
    assert real.sum() == 6


class Cached(torch.nn.Module):
    """A compiled piece that writes rows of a buffer it owns (like a KV cache)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
        self.register_buffer("cache", torch.arange(48.0).view(6, 8) + 1)

    def forward(self, x, slot):
        y = x @ self.w
        self.cache.index_copy_(0, slot, y)
        return y.sum(-1) + self.cache.sum()


class TuningOnCPU(PiecewiseBackend):
    """Runs each fresh artifact once on the CPU too, as kiln does on CUDA; counts those runs."""

    tune_devices = ("cpu", "cuda")
    protect = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tuning_runs = 0

    def _tuning_inputs(self, *args, **kwargs):
        make = super()._tuning_inputs(*args, **kwargs)

        def counted():
            self.tuning_runs += 1
            return make()

        return counted

    def _mutated_inputs(self, piece):
        return super()._mutated_inputs(piece) if self.protect else []


class Unprotected(TuningOnCPU):
    """Positive control: the same run without protecting the buffer."""

    protect = False


@pytest.mark.parametrize("backend_cls, intact", [(TuningOnCPU, True), (Unprotected, False)])
def test_the_tuning_run_never_writes_a_real_buffer(backend_cls, intact):
    torch.manual_seed(0)
    model, eager = Cached(), Cached()
    eager.load_state_dict(model.state_dict())
    backend = backend_cls(CompilationConfig(splitting_ops=[]), None)
    x, slot = torch.randn(3, 8), torch.tensor([3, 4, 5])
    with torch.no_grad():
        torch.compiler.reset()
        torch_internals.mark_dynamic(x, 0)
        torch_internals.mark_dynamic(slot, 0)
        out = torch.compile(model, backend=backend, fullgraph=True)(x, slot)
        want = eager(x, slot)
    assert backend.tuning_runs == 1 and not [w for w in backend.record.warnings if "tuning" in w]
    # Row 0 is no real sequence's: only the tuning run (zeros in, slot 0) could have written it.
    assert torch.equal(model.cache[0], eager.cache[0]) is intact
    if intact:
        assert torch.equal(model.cache, eager.cache)
        torch.testing.assert_close(out, want)


def test_counter_wraps_torch_own_autotuner_and_counts_each_call():
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    original = CachingAutotuner.__dict__["benchmark_all_configs"]
    with torch_internals.count_autotune_benchmarks() as outer:
        wrapped = [(owner, name, fn) for owner, name, fn in torch_internals.autotune_entry_points()
                   if owner is CachingAutotuner and name == "benchmark_all_configs"]
        (_, _, torch_fn) = wrapped[0]
        installed = CachingAutotuner.__dict__["benchmark_all_configs"]
        assert installed.__wrapped__ is torch_fn  # the real torch function sits under the counter
        assert torch_fn.__module__ == "torch._inductor.runtime.triton_heuristics"
        with torch_internals.count_autotune_benchmarks() as inner:
            for _ in range(2):  # no real kernel here: torch's own code fails on a bare object
                with pytest.raises(AttributeError):
                    CachingAutotuner.benchmark_all_configs(object())
        assert inner.calls == 2
    with pytest.raises(AttributeError):
        CachingAutotuner.benchmark_all_configs(object())
    assert outer.calls == 2 and inner.calls == 2  # closed blocks stop counting
    assert original in (installed, torch_fn)  # before: torch's own, or the counter installed once


def test_loaded_kernels_find_the_choices_saved_in_their_build_directory(tmp_path):
    """Through torch's own autotune cache: a kernel compiled in a build directory saves its
    choice there; once the directory is packed, unpacked elsewhere and gone, the path the kernel
    carries finds nothing, and under autotune_results_under(unpacked dir) it finds the choice."""
    from torch._inductor.runtime import triton_heuristics

    configs = [SimpleNamespace(kwargs={"XBLOCK": 64}, num_warps=4, num_stages=1),
               SimpleNamespace(kwargs={"XBLOCK": 128}, num_warps=8, num_stages=1)]
    build, root = tmp_path / "kiln-compile-1" / "build", tmp_path / "kiln-loaded" / "artifact-1"
    kernel = str(build / "ab" / "cabcdef.py")  # Inductor's layout: <cache dir>/<2 chars>/<name>.py
    check = triton_heuristics.check_autotune_cache
    _, cache, info = check(configs, kernel, {})
    assert info["autotune_cache_state"] == "miss" and cache is not None
    cache.save(configs[1], 10**6)  # what the autotuner does after benchmarking, at first launch
    shutil.copytree(build, root)  # packed with the artifact, unpacked on load
    shutil.rmtree(build)
    assert check(configs, kernel, {})[2]["autotune_cache_state"] == "miss"  # the stale path: tune again
    with torch_internals.autotune_results_under(str(root)):
        chosen, _, info = triton_heuristics.check_autotune_cache(configs, kernel, {})
    assert info["autotune_cache_state"] == "hit" and chosen == [configs[1]]
    assert triton_heuristics.check_autotune_cache is check  # put back after the block


def test_relocated_kernel_path():
    root = "/x/kiln-loaded/artifact-1"
    assert torch_internals.relocated_kernel_path("/tmp/gone/build/ab/cab.py", root) == f"{root}/ab/cab.py"
    assert torch_internals.relocated_kernel_path(f"{root}/cd/ccd.py", root) == f"{root}/cd/ccd.py"
    assert torch_internals.relocated_kernel_path(None, root) is None


def test_max_autotune_choices_are_counted_once_inductor_compiles():
    torch_internals.install_autotune_counter(everything=True)  # what compile_graph does first
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    assert AlgorithmSelectorCache.__dict__["benchmark_choices"].__func__.__wrapped__.__module__ == \
        "torch._inductor.select_algorithm"
    with torch_internals.count_autotune_benchmarks() as tuned:
        assert AlgorithmSelectorCache.benchmark_choices([], None) == {}  # no choices: nothing timed
    assert tuned.calls == 1
