"""Cache warm-up on a running Ray cluster, for `ray submit`:

    ray submit cluster.yaml examples/ray_submit_warmup.py -- --tp 2 --sizes 1,2,4,8

Attaches with address="auto", places one rank per GPU (or CPU bundle), warms the shared
per-node cache and writes the report and Perfetto trace next to the cache root.
"""

from __future__ import annotations

import argparse
import os
import sys

# `ray submit` runs this file by path from the cluster's home directory; make the repo importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from orchestrator import CompilationConfig, Orchestrator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="kiln warm-up on a running Ray cluster")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--model", default="examples.toy_llama:build")
    parser.add_argument("--cache-root", default=None)
    parser.add_argument("--address", default="auto")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Ship the repo to every node so workers can import the model (like --working-dir).
    runtime_env = {"working_dir": repo, "excludes": [".git", ".device", ".whl", "benchmarks/results"]}
    with Orchestrator(args.model, args.tp, CompilationConfig(), args.cache_root, address=args.address,
                      runtime_env=runtime_env) as orch:
        report = orch.warmup(sizes)
    print(report.table())
    out = os.path.expanduser(args.cache_root or os.environ.get("KILN_CACHE_ROOT", "~/.cache/kiln"))
    print("report:", report.to_json(os.path.join(out, "last-warmup.json")))
    print("trace: ", report.write_chrome_trace(os.path.join(out, "last-warmup.trace.json")))


if __name__ == "__main__":
    main()
