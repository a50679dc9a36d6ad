"""Compile-phase seconds, cold vs warm: kiln's piecewise cache beside plain torch.compile.

    python benchmarks/compile_startup.py [--depths 2 4 8] [--out results.json]

Each measurement runs in a fresh process. Cold: empty kiln root and empty Inductor cache.
Warm: the same kiln root, but a fresh, empty Inductor/Triton cache, so only what kiln stored
can help. torch.compile warm: the same Inductor cache directory as its cold run (its FX graph
and AOTAutograd caches). "cold s"/"warm s" time the whole first call (Dynamo trace, compile or
load, first run); kiln's "backend" columns time its backend alone (split, then compile or load
every piece), which is the part its cache replaces; Dynamo tracing is paid on every start.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(spec: dict) -> None:
    import torch

    from examples.toy_llama import build

    kwargs = {"layers": spec["layers"], **spec.get("model", {})}
    if spec["tool"] == "kiln":
        from kiln.cache import CacheStore
        from kiln.workers.config import CompilationConfig
        from kiln.workers.layers.custom_op import building_with
        from kiln.workers.runtime.kiln_model import KilnModel

        config = CompilationConfig(cudagraph_mode="NONE")
        with building_with(config):
            model = build(**kwargs)
        kiln = KilnModel(model, config, store=CacheStore(spec["root"]))
        t0 = time.perf_counter()
        record = kiln.compile([8])
        seconds = time.perf_counter() - t0
        times = kiln.forward_fn.times
        out = {"seconds": seconds, "inductor_compiles": record.inductor_compiles, "hits": record.cache_hits,
               "trace_s": times.backend_start - times.dynamo_start,
               "backend_s": times.backend_end - times.backend_start}
    else:
        model = build(**kwargs)
        compiled = torch.compile(model, dynamic=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(*model.example_inputs(8))
        seconds = time.perf_counter() - t0
        out = {"seconds": seconds}
    print(json.dumps(out))


def run(spec: dict, inductor_dir: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir,
           "TRITON_CACHE_DIR": os.path.join(inductor_dir, "triton"),
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from benchmarks.common import machine, print_table, save_json

    print(f"machine: {machine()}", flush=True)
    rows = []
    for layers in args.depths:
        work = tempfile.mkdtemp(prefix="kiln-startup-")
        root = os.path.join(work, "kiln")
        kiln_cold = run({"tool": "kiln", "layers": layers, "root": root}, os.path.join(work, "ind-cold"))
        kiln_warm = run({"tool": "kiln", "layers": layers, "root": root}, os.path.join(work, "ind-warm"))
        tc_dir = os.path.join(work, "ind-torch")
        tc_cold = run({"tool": "torch.compile", "layers": layers}, tc_dir)
        tc_warm = run({"tool": "torch.compile", "layers": layers}, tc_dir)
        row = {
            "layers": layers,
            "kiln cold s": kiln_cold["seconds"], "kiln warm s": kiln_warm["seconds"],
            "kiln warm/cold": kiln_warm["seconds"] / kiln_cold["seconds"],
            "kiln trace s (warm)": kiln_warm["trace_s"],
            "kiln backend cold s": kiln_cold["backend_s"], "kiln backend warm s": kiln_warm["backend_s"],
            "backend warm/cold": kiln_warm["backend_s"] / kiln_cold["backend_s"],
            "kiln compiles": kiln_cold["inductor_compiles"], "kiln warm compiles": kiln_warm["inductor_compiles"],
            "torch.compile cold s": tc_cold["seconds"], "torch.compile warm s": tc_warm["seconds"],
            "torch.compile warm/cold": tc_warm["seconds"] / tc_cold["seconds"],
        }
        rows.append(row)
        print(row, flush=True)
    print()
    table = print_table(rows, list(rows[0]))
    save_json(args.out, {"machine": machine(), "rows": rows, "table": table, "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
