"""Warm-up wall time against tensor-parallel size on CPU ranks (gloo), compile-once on and off.

    python benchmarks/tp_scaling.py [--tps 1 2 4] [--out results.json]

For each TP: a cold warm-up with compile-once (ranks share one cache root: one compiles, the
others wait and load), a cold warm-up with compile-once off (a private root per rank, every
rank compiles), and a warm warm-up; plus the orchestration overhead (cluster start, actors
ready, config broadcast). One embedded Ray cluster with as many logical CPUs as the largest TP.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = {"layers": 4, "hidden": 128, "heads": 8, "kv_heads": 8, "vocab": 512, "max_seq_len": 64, "max_seqs": 8}


def warmup(tp: int, root: str) -> dict:
    from kiln import CompilationConfig, Orchestrator

    t0 = time.perf_counter()
    orch = Orchestrator("examples/toy_llama.py:build", tp, CompilationConfig(cudagraph_mode="NONE"), root,
                        model_kwargs=MODEL, progress=False, device="cpu")
    with orch:
        report = orch.warmup([1, 2, 4, 8])
    wall = time.perf_counter() - t0
    return {"wall": wall, "compiles": report.totals()["inductor_compiles"], "orch": sum(orch.orchestration.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from benchmarks.common import machine, print_table, save_json
    from kiln.orchestrator.cluster import connect

    print(f"machine: {machine()}", flush=True)
    cluster = connect(None, num_cpus=max(args.tps))
    rows = []
    for tp in args.tps:
        work = tempfile.mkdtemp(prefix="kiln-tp-")
        shared = warmup(tp, os.path.join(work, "shared"))
        private = warmup(tp, os.path.join(work, "private", "{rank}"))
        warm = warmup(tp, os.path.join(work, "shared"))
        rows.append({"tp": tp, "cold s (compile once)": shared["wall"], "compiles (once)": shared["compiles"],
                     "cold s (per rank)": private["wall"], "compiles (per rank)": private["compiles"],
                     "warm s": warm["wall"], "warm compiles": warm["compiles"],
                     "orchestration s": warm["orch"]})
        print(rows[-1], flush=True)
    base = rows[0]["cold s (compile once)"]
    for row in rows:
        row["cold vs TP=1"] = row["cold s (compile once)"] / base
    print(f"\ncluster start: {cluster.seconds:.2f} s")
    table = print_table(rows, list(rows[0]))
    save_json(args.out, {"machine": machine(), "model": MODEL, "rows": rows, "table": table,
                         "cluster_start_s": cluster.seconds, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
