"""Several GPUs end to end: `kiln warmup` at TP=N (FULL_AND_PIECEWISE) on an embedded Ray
cluster, then the checks and figures of the multi-GPU benchmark. Needs N CUDA GPUs.

    python benchmarks/multi_gpu_warmup.py --tp 4 --out DIR

Writes DIR/report_cold.json, DIR/trace_cold.json, DIR/report_warm.json, DIR/report_tp<k>.json
(k < N), DIR/checks.json and prints them: per-rank compile/load/capture, compile once (TP=N's
total Inductor compiles against TP=1's), warm start, TP=N vs TP=1 outputs, collectives inside
graphs, decode latency at every power-of-two TP up to N.
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
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the warm-up (GPUs used)")
    p.add_argument("--out", required=True)
    p.add_argument("--cache-root", default=None)
    p.add_argument("--batches", default="1,16,64", help="decode batch sizes to time")
    args = p.parse_args()
    import torch

    if args.tp < 2 or torch.cuda.device_count() < args.tp:
        p.error(f"--tp {args.tp} needs at least 2 and at most the {torch.cuda.device_count()} visible CUDA GPUs")
    os.makedirs(args.out, exist_ok=True)
    root = args.cache_root or tempfile.mkdtemp(prefix="kiln-multigpu-")
    tp_n, batches = args.tp, [int(b) for b in args.batches.split(",")]
    checks: dict = {"tp": tp_n, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    # 1. The CLI, as a user runs it: cold warm-up at TP=N, report and trace written.
    cmd = [sys.executable, "-m", "kiln.orchestrator.cli", "warmup", "examples/toy_llama.py:build", "--tp", str(tp_n),
           "--sizes", ",".join(map(str, SIZES)), "--set", "cudagraph_mode=FULL_AND_PIECEWISE",
           "--set", "cudagraph_copy_inputs=true", "--cache-root", root, "--quiet",
           "--report", f"{args.out}/report_cold.json", "--trace", f"{args.out}/trace_cold.json"]
    cmd += [arg for k, v in MODEL.items() for arg in ("--model-arg", f"{k}={v}")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    assert proc.returncode == 0, "kiln warmup failed"
    cold = json.load(open(f"{args.out}/report_cold.json"))

    from kiln import CompilationConfig, Orchestrator

    ranks = cold["ranks"]
    checks["nccl"] = all(r["dist_backend"] == "nccl" for r in ranks)
    checks["one_gpu_each_as_device_0"] = all(
        r["device"].startswith("cuda:0") and r["cuda_visible_devices"] and "," not in r["cuda_visible_devices"]
        for r in ranks) and len({r["cuda_visible_devices"] for r in ranks}) == tp_n
    compiled = [{p["extra"].get("graph_key") for p in r["phases"] if p["name"].startswith("compile piece")}
                for r in ranks]
    checks["compiles_per_rank"] = [r["inductor_compiles"] for r in ranks]
    checks["ranks_compiled_disjoint_graphs"] = sum(map(len, compiled)) == len(set().union(*compiled))
    checks["unique_pieces"] = ranks[0]["unique_pieces"]

    # 2. The driver API on the same cache: TP=N warm, then each smaller power of two down to TP=1.
    #    Each TP has its own shard shapes, so each compiles its own pieces once: TP=N's total over
    #    all ranks must equal TP=1's (compile once across ranks).
    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    latency: dict = {}
    outputs: dict = {}
    compiles_by_tp = {tp_n: sum(checks["compiles_per_rank"])}
    decode = (torch.arange(16) % 1000, torch.full((16,), 7), torch.arange(16))
    prefill = (torch.arange(64) % 1000, torch.arange(64), torch.zeros(64, dtype=torch.long))
    tps = [tp_n] + [t for t in (8, 4, 2, 1) if t < tp_n]
    for tp in tps:
        with Orchestrator("examples/toy_llama.py:build", tp, config, root, model_kwargs=MODEL, progress=False) as orch:
            report = orch.warmup(SIZES)
            report.to_json(f"{args.out}/report_warm.json" if tp == tp_n else f"{args.out}/report_tp{tp}.json")
            if tp == tp_n:
                checks["warm_compiles"] = report.totals()["inductor_compiles"]
                checks["warm_hits"] = report.totals()["cache_hits"]
                checks["host_allreduce_calls_in_graph_decode_step"] = orch._gather(
                    [w.collective_calls.remote(16) for w in orch.workers], "check")
            else:
                compiles_by_tp[tp] = report.totals()["inductor_compiles"]
            if tp in (tp_n, 1):
                orch.reset_cache()
                outputs[tp] = [orch.run(*prefill, decode=False).float(), orch.run(*decode, decode=True).float()]
            latency[tp] = {b: orch.time_decode(b, steps=100) for b in batches}
    checks["compiles_by_tp"] = compiles_by_tp
    checks["compile_once"] = compiles_by_tp[tp_n] == compiles_by_tp[1]
    checks["tpN_vs_tp1_max_abs_diff"] = [(a - b).abs().max().item() for a, b in zip(outputs[tp_n], outputs[1])]
    checks["tp1_max_abs_logit"] = [b.abs().max().item() for b in outputs[1]]
    checks["decode_latency_ms"] = {tp: {b: [r["median_ms"] for r in rows] for b, rows in lat.items()}
                                   for tp, lat in latency.items()}
    print(json.dumps(checks, indent=2), flush=True)
    json.dump(checks, open(f"{args.out}/checks.json", "w"), indent=2)


if __name__ == "__main__":
    main()
