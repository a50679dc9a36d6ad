"""The cached Dynamo trace: a warm start skips Dynamo, and anything its guards would catch misses.

Level 3 without Inductor (pieces run as traced) keeps these fast: the trace cache works the
same way, and the warm process with Inductor is in test_kiln_compile.py. The model lives in a
file of its own under the test's tmp dir (on sys.path), so a test can edit its source.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln import CompilationConfig
from kiln.cache import CacheStore
from kiln.workers import torch_internals
from kiln.workers.compilation.backend import compile_forward
from kiln.workers.compilation.cached_trace import GRAPH_KEY

SOURCE = '''
import torch


class Norm(torch.nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Net(torch.nn.Module):
    def __init__(self, dim=8, eps=1e-6):
        super().__init__()
        self.norm = Norm(dim, eps)
        self.proj = torch.nn.Linear(dim, dim)
        self.scale = 2.0

    def forward(self, x):
        h = torch.nn.functional.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])[:, 0]
        return self.proj(self.norm(h + x)) * self.scale
'''

CONFIG = CompilationConfig(use_inductor=False)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test as in a new process: Dynamo remembers the values it saw in this one and would
    make a float that changed between tests an input of the graph instead of a constant."""
    torch._dynamo.reset()


@pytest.fixture
def net_module(tmp_path, monkeypatch):
    """A fresh import of the model file (tmp_path/kiln_trace_net.py) and a way to edit it."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "kiln_trace_net.py"
    path.write_text(SOURCE)
    monkeypatch.syspath_prepend(str(src))

    def load():
        spec = importlib.util.spec_from_file_location("kiln_trace_net", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["kiln_trace_net"] = module
        return module

    yield load, path
    sys.modules.pop("kiln_trace_net", None)


def run(model, x, root, config=CONFIG):
    """(output, trace status, Dynamo frames traced) of a first call through kiln.compile."""
    before = torch_internals.dynamo_graphs_traced()
    compiled = kiln.compile(model, config, cache_root=root)
    out = compiled(x)
    return out, compiled.record.trace_cache, torch_internals.dynamo_graphs_traced() - before


def eager(model, x):
    with torch.no_grad():
        return model(x)


def x_batch(n=4, dim=8, dtype=torch.float32):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(n), dtype=dtype)


def warm(load, root, x=None):
    """Trace once (cold) and check the second compile skips Dynamo; returns the module."""
    module = load()
    x = x_batch() if x is None else x
    _, status, frames = run(module.Net(), x, root)
    assert frames == 1 and status.startswith("ran (") and "cached for the next start" in status, (frames, status)
    model = module.Net()
    out, status, frames = run(model, x, root)
    assert (status, frames) == ("skipped (cached)", 0)
    torch.testing.assert_close(out, eager(model, x))
    return module


def test_warm_compile_runs_no_dynamo_and_any_batch_size_works(net_module, tmp_path):
    load, _ = net_module
    module = warm(load, tmp_path / "cache")
    model = module.Net()
    compiled = kiln.compile(model, CONFIG, cache_root=tmp_path / "cache")
    before = torch_internals.dynamo_graphs_traced()
    for n in (4, 2, 7, 33):  # the cached graph keeps its symbolic batch
        torch.testing.assert_close(compiled(x_batch(n)), eager(model, x_batch(n)))
    assert torch_internals.dynamo_graphs_traced() == before
    assert compiled.record.trace_cache == "skipped (cached)"


@pytest.mark.parametrize("change", ["parameter shape", "input dtype", "constant eps", "attribute scale",
                                    "config"])
def test_each_factor_changed_alone_traces_again(net_module, tmp_path, change):
    load, _ = net_module
    root = tmp_path / "cache"
    module = warm(load, root)
    model, x, config = module.Net(), x_batch(), CONFIG
    if change == "parameter shape":
        model, x = module.Net(dim=16), x_batch(dim=16)
    elif change == "input dtype":
        model, x = module.Net().double(), x_batch(dtype=torch.float64)
    elif change == "constant eps":
        model.norm.eps = 0.5  # baked into the graph as a constant by Dynamo
    elif change == "attribute scale":
        model.scale = 3.0
    else:
        config = CompilationConfig(use_inductor=False, splitting_ops=[])
    torch._dynamo.reset()  # as in a new process (see fresh_dynamo)
    out, status, frames = run(model, x, root, config)
    assert frames == 1 and status == "ran (no cached trace for this model, call and config; cached for the next start)"
    torch.testing.assert_close(out, eager(model, x))
    if change in ("constant eps", "attribute scale"):  # the old graph would have been wrong
        assert not torch.allclose(out, eager(module.Net(), x))


def test_grad_mode_is_a_key_factor(net_module, tmp_path):
    load, _ = net_module
    module = load()
    store = CacheStore(tmp_path / "cache")
    statuses = []
    for grad in (False, False, True):
        forward, _ = compile_forward(module.Net(), CONFIG, store=store)
        with torch.set_grad_enabled(grad):
            forward(x_batch())
        statuses.append(forward.cache.status)
    assert statuses[1] == "skipped (cached)"
    assert statuses[2].startswith("ran (no cached trace")


def test_source_edit_traces_again(net_module, tmp_path):
    load, path = net_module
    root = tmp_path / "cache"
    warm(load, root)
    path.write_text(SOURCE.replace("* self.scale", "* self.scale + 1.0"))
    model = load().Net()
    out, status, frames = run(model, x_batch(), root)
    assert frames == 1 and status.startswith("ran (a traced source file changed")
    torch.testing.assert_close(out, eager(model, x_batch()))
    _, status, frames = run(load().Net(), x_batch(), root)  # the edited source's trace replaced it
    assert (status, frames) == ("skipped (cached)", 0)


def _trace_entry(root: Path):
    """The cache entry holding the trace record, opened as kiln opens it."""
    [factors] = [json.loads(p.read_text()) for p in root.glob("*/key_factors.json")
                 if json.loads(p.read_text()).get("kind") == "dynamo_trace"]
    return CacheStore(root).entry(factors)


def test_corrupted_record_is_detected_and_retraced(net_module, tmp_path):
    load, _ = net_module
    root = tmp_path / "cache"
    warm(load, root)
    entry = _trace_entry(root)
    digest, _ = entry.lookup(GRAPH_KEY)
    blob = entry.blob_path(digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    model = load().Net()
    out, status, frames = run(model, x_batch(), root)
    assert frames == 1 and status.startswith("ran (no cached trace")  # the flipped blob was quarantined
    torch.testing.assert_close(out, eager(model, x_batch()))
    assert any((entry.path / "quarantine").iterdir())


def test_a_record_naming_another_function_is_dropped_never_run(net_module, tmp_path, monkeypatch):
    load, _ = net_module
    root = tmp_path / "cache"
    warm(load, root)
    entry = _trace_entry(root)
    _, data = entry.lookup(GRAPH_KEY)
    record = json.loads(data)
    calls = [n for p in record["pieces"] if p.get("graph") for n in p["graph"]["nodes"]
             if isinstance(n["target"], dict) and "fn" in n["target"]]
    calls[0]["target"] = {"fn": "os", "name": "system"}  # a valid digest over a hostile record
    entry.invalidate(GRAPH_KEY, "test rewrites the record")
    entry.get_or_compute(GRAPH_KEY, lambda: json.dumps(record).encode())
    monkeypatch.setattr("os.system", lambda *a: pytest.fail("a cached trace called os.system"))
    model = load().Net()
    out, status, frames = run(model, x_batch(), root)
    assert frames == 1 and "cached trace unusable" in status and "outside torch" in status
    torch.testing.assert_close(out, eager(model, x_batch()))
    assert entry.lookup(GRAPH_KEY) is not None  # the retrace cached a good record again
    _, status, frames = run(load().Net(), x_batch(), root)
    assert (status, frames) == ("skipped (cached)", 0)


def test_an_attribute_kiln_cannot_key_means_always_trace(net_module, tmp_path):
    load, _ = net_module

    class Opaque:
        __slots__ = ("value",)

    module = load()
    model = module.Net()
    model.opaque = Opaque()
    for _ in range(2):
        out, status, frames = run(model, x_batch(), tmp_path / "cache")
        assert frames == 1 and status.startswith("ran (not cacheable: <root>['opaque']: a ")
    torch.testing.assert_close(out, eager(model, x_batch()))
