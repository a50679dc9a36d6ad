"""TP=2 and TP=4 over NCCL through the driver API (run on a 2- or 4-GPU device: pytest -m cuda)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

MODEL = {"layers": 2, "hidden": 128, "heads": 4, "kv_heads": 4, "vocab": 512, "max_seq_len": 64,
         "max_seqs": 16, "dtype": "float32"}


@pytest.fixture(scope="module")
def ray_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import ray

    from kiln.orchestrator.cluster import connect

    connect(None)
    yield
    ray.shutdown()


@pytest.mark.parametrize("tp_n", [2, 4])
def test_tp_nccl_graphs_compile_once_and_match_tp1(ray_gpus, tmp_path, tp_n):
    if torch.cuda.device_count() < tp_n:
        pytest.skip(f"needs {tp_n} GPUs")
    from kiln import CompilationConfig, Orchestrator

    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    decode = (torch.arange(4), torch.full((4,), 2), torch.arange(4))
    outs, compiles = {}, {}
    for tp in (tp_n, 1):
        with Orchestrator("examples/toy_llama.py:build", tp, config, str(tmp_path / "root"),
                          model_kwargs=MODEL, progress=False) as orch:
            report = orch.warmup([1, 2, 4])
            orch.reset_cache()
            outs[tp] = orch.run(*decode, decode=True)
            ranks = report.ranks
            compiles[tp] = sum(r["inductor_compiles"] for r in ranks)
            if tp == tp_n:
                assert [r["dist_backend"] for r in ranks] == ["nccl"] * tp_n
                assert all(r["device"].startswith("cuda:0") for r in ranks)
                assert len({r["cuda_visible_devices"] for r in ranks}) == tp_n
                assert compiles[tp] == ranks[0]["unique_pieces"]
                calls = orch._gather([w.collective_calls.remote(4) for w in orch.workers], "check")
                assert calls == [0] * tp_n, "all-reduce ran outside the captured graphs"
    # Compile once: all TP=N ranks together compiled what one TP=1 rank compiles (each TP has
    # its own shard shapes, so both started cold).
    assert compiles[tp_n] == compiles[1]
    torch.testing.assert_close(outs[tp_n], outs[1], rtol=1e-4, atol=1e-4)
