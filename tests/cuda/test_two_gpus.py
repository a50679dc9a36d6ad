"""TP=2 over NCCL on two GPUs through the driver API (run on a 2-GPU device: pytest -m cuda)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

MODEL = {"layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "vocab": 512, "max_seq_len": 64,
         "max_seqs": 16, "dtype": "float32"}


@pytest.fixture(scope="module")
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import ray

    from orchestrator.cluster import connect

    connect(None)
    yield
    ray.shutdown()


def test_tp2_nccl_graphs_compile_once_and_match_tp1(two_gpus, tmp_path):
    from orchestrator import CompilationConfig, Orchestrator

    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    decode = (torch.arange(4), torch.full((4,), 2), torch.arange(4))
    outs = {}
    for tp in (2, 1):
        with Orchestrator("examples/toy_llama.py:build", tp, config, str(tmp_path / "root"),
                          model_kwargs=MODEL, progress=False) as orch:
            report = orch.warmup([1, 2, 4])
            orch.reset_cache()
            outs[tp] = orch.run(*decode, decode=True)
            if tp == 2:
                ranks = report.ranks
                assert [r["dist_backend"] for r in ranks] == ["nccl", "nccl"]
                assert all(r["device"].startswith("cuda:0") for r in ranks)
                assert len({r["cuda_visible_devices"] for r in ranks}) == 2
                assert sum(r["inductor_compiles"] for r in ranks) == ranks[0]["unique_pieces"]
                calls = orch._gather([w.collective_calls.remote(4) for w in orch.workers], "check")
                assert calls == [0, 0], "all-reduce ran outside the captured graphs"
    torch.testing.assert_close(outs[2], outs[1], rtol=1e-4, atol=1e-4)
