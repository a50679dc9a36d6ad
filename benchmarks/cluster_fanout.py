"""Cluster fan-out: Inductor compiles and wall time of a cold TP=4 warm-up over two simulated nodes,
fan-out on and off, and a third node's warm start from the cluster against its own cold cache.

    python benchmarks/cluster_fanout.py [--layers 2] [--out results.json]

Simulated nodes (ray.cluster_utils.Cluster on 127.0.0.1), 2 logical CPUs each, every node with
its own cache root (`{node}`): what DESIGN.md recommends (local disks, no shared NFS cache).
Rows:
- `off, cold`: TP=4 over nodes A and B with fan-out off: each node compiles every graph.
- `on, cold`: the same with fresh roots and fan-out on: each unique graph is compiled once.
- `third node, cluster`: a TP=4 job on node C (4 CPUs, fresh root) while the `on` job still
  runs (its workers own the published objects): fetches instead of compiling.
- `third node, cold`: the same job with fan-out off and a fresh root: compiles everything.
Per-rank figures: compiled, loaded locally, fetched (MiB, seconds), waiting for another node's
compile (cluster wait s) and for a rank of the same node (local wait s).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # simulated nodes stay on 127.0.0.1

MIB = 1 << 20


def model_kwargs(layers: int) -> dict:
    return {"layers": layers, "hidden": 64, "heads": 4, "kv_heads": 4, "vocab": 256, "max_seq_len": 32, "max_seqs": 4}


def run(address: str, root: str, fanout: str, kwargs: dict, sizes: list[int], keep: bool = False):
    from kiln import CompilationConfig, Orchestrator

    orch = Orchestrator("examples/toy_llama.py:build", 4, CompilationConfig(cudagraph_mode="NONE"),
                        os.path.join(root, "{node}"), address=address, model_kwargs=kwargs, progress=False,
                        device="cpu", fanout=fanout)
    t0 = time.perf_counter()
    report = orch.warmup(sizes)
    wall = time.perf_counter() - t0
    if not keep:
        orch.shutdown()
    return orch, report, wall


def summary(name: str, report, wall: float) -> dict:
    from kiln.orchestrator.fanout import unique_graphs

    fan = [r["fanout"] or {} for r in report.ranks]
    return {
        "scenario": name,
        "nodes": len({r["node_id"] for r in report.ranks}),
        "compiles": report.totals()["inductor_compiles"],
        "unique graphs": unique_graphs(report.ranks),
        "fetched": sum(f.get("fetched", 0) for f in fan),
        "fetched MiB": sum(f.get("bytes_fetched", 0) for f in fan) / MIB,
        "fallbacks": sum(len(f.get("fallbacks", [])) for f in fan),
        "wall s": wall,
    }


def per_rank(name: str, report) -> list[dict]:
    rows = []
    for r in report.ranks:
        f = r["fanout"] or {}
        local_wait = sum(p["seconds"] for p in r["phases"] if p["name"].startswith("wait piece"))
        rows.append({"scenario": name, "rank": r["rank"], "node": r["node_id"][:6],
                     "compiled": r["inductor_compiles"], "loaded": r["artifacts_loaded"],
                     "fetched": f.get("fetched", 0), "fetch MiB": f.get("bytes_fetched", 0) / MIB,
                     "fetch s": f.get("fetch_seconds", 0.0), "cluster wait s": f.get("wait_seconds", 0.0),
                     "local wait s": local_wait, "rank wall s": r["wall_seconds"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2, help="Layers of the example model (unique graphs do not grow).")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.common import machine, print_table, save_json

    print(f"machine: {machine()}; {os.cpu_count()} cores", flush=True)
    kwargs = model_kwargs(args.layers)
    work = tempfile.mkdtemp(prefix="kiln-fanout-")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        results, ranks = [], []
        _, report, wall = run(cluster.address, os.path.join(work, "off"), "off", kwargs, args.sizes)
        results.append(summary("off, cold (2 nodes)", report, wall))
        ranks += per_rank("off, cold", report)
        running, report, wall = run(cluster.address, os.path.join(work, "on"), "on", kwargs, args.sizes, keep=True)
        results.append(summary("on, cold (2 nodes)", report, wall))
        ranks += per_rank("on, cold", report)

        cluster.add_node(num_cpus=4)  # joins while the `on` job still serves its artifacts
        cluster.wait_for_nodes()
        _, report, wall = run(cluster.address, os.path.join(work, "third-cluster"), "on", kwargs, args.sizes)
        results.append(summary("third node, from cluster", report, wall))
        ranks += per_rank("third node, cluster", report)
        # Fan-out off; the `on` job still holds nodes A and B, so this one runs on node C too.
        _, report, wall = run(cluster.address, os.path.join(work, "third-cold"), "off", kwargs, args.sizes)
        results.append(summary("third node, own cold cache", report, wall))
        ranks += per_rank("third node, cold", report)
        running.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"\nexample model: {kwargs}, sizes {args.sizes}, TP=4, cudagraph_mode NONE, CPU ranks (gloo)\n")
    table = print_table(results, list(results[0]))
    print()
    rank_table = print_table(ranks, list(ranks[0]))
    save_json(args.out, {"machine": machine(), "model": kwargs, "sizes": args.sizes, "results": results,
                         "ranks": ranks, "table": table, "rank_table": rank_table})


if __name__ == "__main__":
    main()
