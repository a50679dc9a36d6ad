"""The Python driver API for a tensor-parallel setup (TP=2), on an embedded Ray cluster.

    python examples/driver_api.py [--tp 2] [--cache-root DIR]

Warms the cache for the example model, prints the per-rank table, then runs a prefill and a
decode step on all ranks and checks rank 0's logits against the unsharded model.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

# `python examples/driver_api.py` puts examples/ on sys.path, not the repo root that holds the
# examples and orchestrator packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.toy_llama import build  # noqa: E402
from kiln import CompilationConfig, Orchestrator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--cache-root", default=None)
    args = parser.parse_args()

    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE")
    with Orchestrator("examples/toy_llama.py:build", args.tp, config, args.cache_root) as orch:
        report = orch.warmup([1, 2, 4, 8])
        print(report.table())

        reference = build()  # the whole model on this process
        # prefill: one sequence (slot 0) of 5 tokens, then one decode step
        ids, pos, slots = torch.tensor([1, 7, 3, 9, 4]), torch.arange(5), torch.zeros(5, dtype=torch.long)
        for inputs in ((ids, pos, slots), (torch.tensor([11]), torch.tensor([5]), torch.tensor([0]))):
            logits = orch.run(*inputs)
            expected = reference(*inputs)
            err = (logits - expected.cpu()).abs().max().item()
            print(f"tokens={inputs[0].numel()}  max |TP{args.tp} - TP1| = {err:.2e}")


if __name__ == "__main__":
    main()
