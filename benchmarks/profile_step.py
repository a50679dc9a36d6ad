"""Profile one decode step of a kiln variant: where does a step's time go?

    python benchmarks/profile_step.py --mode PIECEWISE --batch 1 [--out profile.json]

Prints torch.profiler's table of the top ops by CPU time (launch overhead shows up there) and
the step's median latency; --out saves both as JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, median_ms, save_json  # noqa: E402
from benchmarks.cudagraph_decode import CAPTURE_SIZES, decode_inputs, model_kwargs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="PIECEWISE")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache-root", default=None)
    p.add_argument("--out", default=None, help="save the median and the profiler table as JSON here")
    args = p.parse_args()
    ns = argparse.Namespace(layers=8, hidden=1024, heads=16, kv_heads=8, intermediate=2816, vocab=32000,
                            max_seq_len=512, batches=[64])
    from kiln.cache import CacheStore
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(cudagraph_mode=args.mode, cudagraph_copy_inputs=True)
    with building_with(config):
        model = build(**model_kwargs(ns))
    kiln = KilnModel(model, config, store=CacheStore(args.cache_root or tempfile.mkdtemp()))
    kiln.compile(CAPTURE_SIZES)
    inputs = decode_inputs(args.batch, 10)
    with torch.no_grad():
        median = median_ms(lambda: kiln(*inputs, decode=True))
        print(f"{args.mode} b={args.batch}: median {median:.3f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                kiln(*inputs, decode=True)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    save_json(args.out, {"machine": machine(), "model": model_kwargs(ns), "mode": args.mode, "batch": args.batch,
                         "median_ms": median, "profile_steps": 20, "table": table,
                         "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
