"""Cache warm-up on a running Ray cluster, for `ray submit`:

    ray submit examples/cluster.yaml examples/ray_submit_warmup.py -- --tp 2 --sizes 1,2,4,8

Attaches with address="auto", places one rank per GPU (or CPU bundle), warms the shared
per-node cache and writes the report and Perfetto trace next to the cache root.

`ray submit` copies this file alone to the head node's home directory, so the repo is found
through $KILN_REPO, by default ~/kiln: where examples/cluster.yaml's file_mounts put it.
"""

from __future__ import annotations

import argparse
import os
import sys

# The repo on the head node; this file's own directory is ~ there, not the repo's examples/.
REPO = os.path.abspath(os.path.expanduser(os.environ.get("KILN_REPO") or "~/kiln"))
if not os.path.isdir(os.path.join(REPO, "orchestrator")):
    sys.exit(f"ray_submit_warmup: no kiln repo at {REPO}; set KILN_REPO or mount it there (examples/cluster.yaml)")
sys.path.insert(0, REPO)

from kiln import CompilationConfig, Orchestrator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description="kiln warm-up on a running Ray cluster")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--model", default="examples.toy_llama:build")
    parser.add_argument("--cache-root", default=None)
    parser.add_argument("--address", default="auto")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    # Ship the repo to every node so workers can import the model (like --working-dir).
    runtime_env = {"working_dir": REPO, "excludes": [".git", ".device", ".whl", "benchmarks/results"]}
    with Orchestrator(args.model, args.tp, CompilationConfig(), args.cache_root, address=args.address,
                      runtime_env=runtime_env) as orch:
        report = orch.warmup(sizes)
    print(report.table())
    out = os.path.expanduser(args.cache_root or os.environ.get("KILN_CACHE_ROOT", "~/.cache/kiln"))
    print("report:", report.to_json(os.path.join(out, "last-warmup.json")))
    print("trace: ", report.write_chrome_trace(os.path.join(out, "last-warmup.trace.json")))


if __name__ == "__main__":
    main()
