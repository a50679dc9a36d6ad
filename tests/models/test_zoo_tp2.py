"""The zoo at TP=2 with CPU ranks (gloo) through the driver and the CLI, on one local Ray
cluster: rank 0's logits equal transformers' for every architecture (eager, level 0); a compiled
warm-up through `kiln warmup` compiles each distinct piece once across layers and ranks; dummy
weights need config.json alone; a bad checkpoint fails in the build phase, before any compile."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.cli import main
from kiln.orchestrator.driver import WarmupError
from tests.models.conftest import CASES, MODEL_ARGS, copy_checkpoint, distinct_pieces, flattened_batch, reference_logits


def _phase(rank_report: dict, name: str) -> dict:
    return next(p for p in rank_report["phases"] if p["name"] == name)


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_matches_transformers(name, checkpoints, ray_cluster, tmp_path):
    tiny = checkpoints(name)
    want_prefill, want_decode = reference_logits(tiny.hf, tiny.vocab)
    _, prefill, _, decode = flattened_batch(tiny.vocab)
    with Orchestrator(str(tiny.path), 2, CompilationConfig(level=0), str(tmp_path / "cache"),
                      model_kwargs=MODEL_ARGS, device="cpu", progress=False) as orch:
        report = orch.warmup([2])
        orch.reset_cache()
        got_prefill = orch.run(*prefill)
        got_decode = orch.run(*decode, decode=True)
    assert got_prefill.shape == want_prefill.shape  # full vocabulary from the vocab-parallel head
    torch.testing.assert_close(got_prefill, want_prefill, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_decode, want_decode, rtol=1e-4, atol=1e-5)
    # Each rank read only its slices: about half the checkpoint (norms, and the single KV head
    # of llama2, are replicated).
    total = sum(os.path.getsize(f) for f in tiny.path.glob("*.safetensors"))
    loaded = [_phase(r, "load_weights")["extra"] for r in report.ranks]
    assert all(0 < facts["bytes"] < 0.75 * total and facts["gb_per_s"] > 0 for facts in loaded)


def test_cli_warmup_compiles_identical_layers_once(checkpoints, ray_cluster, tmp_path, monkeypatch):
    tiny = checkpoints("llama2")  # 3 layers: the two middle pieces are identical
    assert tiny.layers == 3
    report_path = tmp_path / "report.json"
    monkeypatch.chdir(tiny.path.parent)  # MODEL as a user types it: a relative directory
    result = CliRunner().invoke(main, [
        "warmup", "./llama2", "--tp", "2", "--sizes", "2", "--device", "cpu", "--num-cpus", "4",
        "--cache-root", str(tmp_path / "cache"), "--model-arg", "max_seq_len=16", "--model-arg", "max_seqs=4",
        "--model-arg", "device=cpu", "--report", str(report_path), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    ranks = report["ranks"]
    # Both ranks trace the same graphs (no rank number in them) and the middle layers' pieces are
    # the same graph: one Inductor compile per distinct piece, in total.
    assert sum(r["inductor_compiles"] for r in ranks) == distinct_pieces(tiny.layers) == 3
    for r in ranks:
        assert r["pieces_compiled"] == tiny.layers + 1 and r["unique_pieces"] == 3
        assert r["pieces_splitting"] == tiny.layers
        assert _phase(r, "load_weights")["extra"]["bytes"] > 0

    # The driver API on the same directory and cache: nothing compiled again, and the compiled
    # TP=2 model (masked embedding, all-gathered head, replicated KV head) matches transformers.
    want_prefill, want_decode = reference_logits(tiny.hf, tiny.vocab)
    _, prefill, _, decode = flattened_batch(tiny.vocab)
    with Orchestrator("./llama2", tp_size=2, cache_root=str(tmp_path / "cache"), model_kwargs=MODEL_ARGS,
                      device="cpu", progress=False) as orch:
        assert orch.warmup([2]).totals()["inductor_compiles"] == 0
        orch.reset_cache()
        torch.testing.assert_close(orch.run(*prefill), want_prefill, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(orch.run(*decode, decode=True), want_decode, rtol=1e-4, atol=1e-5)


def test_cli_warmup_with_dummy_weights(checkpoints, ray_cluster, tmp_path):
    tiny = checkpoints("qwen3")
    only_config = tmp_path / "qwen3-config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((tiny.path / "config.json").read_text())
    report_path = tmp_path / "report.json"
    args = ["warmup", str(only_config), "--tp", "2", "--sizes", "2", "--device", "cpu", "--num-cpus", "4",
            "--cache-root", str(tmp_path / "cache"), "--set", "level=0", "--model-arg", "max_seq_len=16",
            "--report", str(report_path), "--quiet"]
    result = CliRunner().invoke(main, [*args, "--load-format", "dummy"])
    assert result.exit_code == 0, result.output
    ranks = json.loads(report_path.read_text())["ranks"]
    # Nothing read: a build phase, and no weight-loading phase.
    assert len(ranks) == 2 and all(not any(p["name"] == "load_weights" for p in r["phases"]) for r in ranks)
    assert all(_phase(r, "build_model")["kind"] == "build" for r in ranks)


def test_truncated_checkpoint_fails_in_build_before_any_compile(checkpoints, ray_cluster, tmp_path):
    broken = copy_checkpoint(checkpoints("mistral"), tmp_path / "broken")
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    orch = Orchestrator(str(broken), 2, CompilationConfig(), str(tmp_path / "cache"), model_kwargs=MODEL_ARGS,
                        device="cpu", progress=False)
    with orch, pytest.raises(WarmupError) as info:
        orch.warmup([2])
    failures = info.value.failures
    assert failures and all(f["phase"] == "build_model" for f in failures)
    assert "truncated" in failures[0]["cause"] and str(file) in failures[0]["cause"]
    assert "lies past the end" in failures[0]["cause"]  # and names the first tensor cut off
    assert not os.path.exists(tmp_path / "cache") or not any((tmp_path / "cache").rglob("index.json"))
