"""CUDA graph modes against eager on a GPU (run on the device: pytest -m cuda).

Every mode must give eager's outputs for batch sizes that were captured, that are padded up to
a captured size, and that are above the largest capture size; for decode and prefill batches.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

MODES = ["NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]
SIZES = [1, 2, 4, 8]
MODEL = {"layers": 3, "hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 512, "max_seq_len": 64,
         "max_seqs": 16, "dtype": "float32", "device": "cuda"}


def _batches():
    # (name, inputs builder, decode flag): decode = one new token per sequence
    def decode(n):
        return torch.arange(n) % 500, torch.full((n,), 3), torch.arange(n)

    def prefill(n):
        return torch.arange(n) % 500, torch.arange(n), torch.zeros(n, dtype=torch.long)

    for n in (4, 3, 12):  # captured, padded, above the largest capture
        yield f"decode{n}", decode(n), True
        yield f"prefill{n}", prefill(n), False


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-cache")


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_eager(mode, cache_root):
    from kiln.cache import CacheStore
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(cudagraph_mode=mode, cudagraph_copy_inputs=True)
    with building_with(config):
        model = build(**MODEL)
    eager = build(**MODEL)
    kiln = KilnModel(model, config, store=CacheStore(cache_root))
    kiln.compile(SIZES)
    if mode != "NONE":
        assert kiln.pool is not None and kiln.pool.stats, "nothing was captured"
    for name, inputs, is_decode in _batches():
        inputs = [t.cuda() for t in inputs]
        model.reset_cache()
        eager.reset_cache()
        # write some history first so attention reads earlier positions
        history = [torch.arange(16, device="cuda") % 7, torch.arange(16, device="cuda") % 3,
                   torch.arange(16, device="cuda")]
        kiln(*history, decode=False)
        eager(*history)
        got = kiln(*inputs, decode=is_decode).clone()
        want = eager(*inputs)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4, msg=f"{mode} {name}")


def test_static_buffer_contract(cache_root):
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(cudagraph_mode="FULL", cudagraph_copy_inputs=False)
    with building_with(config):
        model = build(**MODEL)
    kiln = KilnModel(model, config)
    kiln.compile(SIZES)
    with pytest.raises(ValueError, match="input_buffers"):
        kiln(*[t.cuda() for t in model.example_inputs(3)], decode=True)
    bufs = kiln.input_buffers(3)
    for buf, value in zip(bufs, model.example_inputs(3)):
        buf.copy_(value)
    out = kiln(*bufs, decode=True).clone()  # a replay's output is kiln's static buffer
    assert out.shape[0] == 3
    # place(): the caller's batch copied into kiln's buffers (what the Ray worker's run() does);
    # the same step again writes the same keys/values, so the output is the same.
    placed = kiln.place(*[t.cuda() for t in model.example_inputs(3)])
    assert [p.data_ptr() for p in placed] == [b.data_ptr() for b in kiln.input_buffers(3)]
    torch.testing.assert_close(kiln(*placed, decode=True).clone(), out)
    # An input that does not fit its buffer is an error, never a silent broadcast or cast.
    bad = [t.cuda() for t in model.example_inputs(3)]
    bad[1] = bad[1].to(torch.int32)
    with pytest.raises(ValueError, match="input 1.*does not fit"):
        kiln.place(*bad)


def test_all_reduce_free_capture_reports_memory_and_time(cache_root):
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    with building_with(config):
        model = build(**MODEL)
    kiln = KilnModel(model, config)
    record = kiln.compile(SIZES)
    capture = next(p for p in record.phases if p.name == "capture")
    assert capture.extra["sizes"] == len(SIZES)
    # full graphs per size + one piecewise graph per compiled piece and size
    assert capture.extra["graphs"] == len(SIZES) * (1 + 4)
    assert capture.seconds > 0 and capture.extra["gib"] >= 0
