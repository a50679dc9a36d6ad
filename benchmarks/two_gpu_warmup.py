"""Two GPUs end to end: `kiln warmup` at TP=2 (FULL_AND_PIECEWISE) on an embedded Ray cluster,
then the checks and figures of the two-GPU benchmark. Needs 2 CUDA GPUs.

    python benchmarks/two_gpu_warmup.py --out DIR

Writes DIR/report_cold.json, DIR/trace_cold.json, DIR/report_warm.json, DIR/checks.json and
prints a summary: per-rank compile/load/capture, compile-once, warm start, TP=2 vs TP=1
outputs, collectives inside graphs, decode latency at TP=1 and TP=2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = {"layers": 8, "hidden": 1024, "heads": 16, "kv_heads": 8, "intermediate": 2816, "vocab": 32000,
         "max_seq_len": 512, "max_seqs": 64, "dtype": "bfloat16"}
SIZES = [1, 2, 4] + list(range(8, 257, 8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cache-root", default=None)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    root = args.cache_root or tempfile.mkdtemp(prefix="kiln-2gpu-")
    checks: dict = {}

    # 1. The CLI, as a user runs it: cold warm-up at TP=2, report and trace written.
    cmd = [sys.executable, "-m", "orchestrator.cli", "warmup", "examples/toy_llama.py:build", "--tp", "2",
           "--sizes", ",".join(map(str, SIZES)), "--set", "cudagraph_mode=FULL_AND_PIECEWISE",
           "--set", "cudagraph_copy_inputs=true", "--cache-root", root, "--quiet",
           "--report", f"{args.out}/report_cold.json", "--trace", f"{args.out}/trace_cold.json"]
    cmd += [arg for k, v in MODEL.items() for arg in ("--model-arg", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    assert proc.returncode == 0, "kiln warmup failed"
    cold = json.load(open(f"{args.out}/report_cold.json"))

    import torch

    from examples.toy_llama import build
    from orchestrator import CompilationConfig, Orchestrator

    ranks = cold["ranks"]
    checks["nccl"] = all(r["dist_backend"] == "nccl" for r in ranks)
    checks["one_gpu_each_as_device_0"] = all(
        r["device"].startswith("cuda:0") and r["cuda_visible_devices"] and "," not in r["cuda_visible_devices"]
        for r in ranks) and len({r["cuda_visible_devices"] for r in ranks}) == 2
    compiled = [{p["extra"].get("graph_key") for p in r["phases"] if p["name"].startswith("compile piece")}
                for r in ranks]
    checks["compiles_per_rank"] = [r["inductor_compiles"] for r in ranks]
    checks["ranks_compiled_disjoint_graphs"] = not (compiled[0] & compiled[1])
    checks["compile_once_total"] = sum(r["inductor_compiles"] for r in ranks)
    checks["unique_pieces"] = ranks[0]["unique_pieces"]

    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    latency: dict = {}
    outputs: dict = {}
    decode = (torch.arange(16) % 1000, torch.full((16,), 7), torch.arange(16))
    prefill = (torch.arange(64) % 1000, torch.arange(64), torch.zeros(64, dtype=torch.long))
    for tp in (2, 1):
        with Orchestrator("examples/toy_llama.py:build", tp, config, root, model_kwargs=MODEL, progress=False) as orch:
            report = orch.warmup(SIZES)
            report.to_json(f"{args.out}/report_warm.json" if tp == 2 else f"{args.out}/report_tp1.json")
            if tp == 2:
                checks["warm_compiles"] = report.totals()["inductor_compiles"]
                checks["warm_hits"] = report.totals()["cache_hits"]
                checks["host_allreduce_calls_in_graph_decode_step"] = orch._gather(
                    [w.collective_calls.remote(16) for w in orch.workers], "check")
            orch.reset_cache()
            outputs[tp] = [orch.run(*prefill, decode=False).float(), orch.run(*decode, decode=True).float()]
            latency[tp] = {b: orch.time_decode(b, steps=100) for b in (1, 16)}
    checks["tp2_vs_tp1_max_abs_diff"] = [(a - b).abs().max().item() for a, b in zip(outputs[2], outputs[1])]
    checks["tp2_vs_tp1_max_abs_logit"] = [b.abs().max().item() for b in outputs[1]]
    checks["decode_latency_ms"] = {tp: {b: [r["median_ms"] for r in rows] for b, rows in lat.items()}
                                   for tp, lat in latency.items()}
    del build
    print(json.dumps(checks, indent=2), flush=True)
    json.dump(checks, open(f"{args.out}/checks.json", "w"), indent=2)


if __name__ == "__main__":
    main()
