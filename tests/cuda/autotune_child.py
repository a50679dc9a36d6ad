"""Child process of test_warm_autotune.py: compile a small CUDA model with kiln, run it at a few
batch sizes, print one JSON line with Inductor's compile and autotuning counts and the outputs.

    python autotune_child.py '{"root": CACHE_ROOT}'
"""

from __future__ import annotations

import json
import sys

import torch

HIDDEN, VOCAB = 2048, 8192
SIZES = [16, 8, 3, 64]  # the first call traces (and compiles the symbolic artifacts) at 16
COMPILE_SIZES = [8]


class RMSNormSoftmax(torch.nn.Module):
    """Reductions over wide rows (an RMSNorm over 2048, a softmax over 8192) and pointwise
    work: kernels for which Inductor generates several configs and Triton autotunes."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.Parameter(torch.rand(HIDDEN) + 0.5)
        self.up = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        logits = self.up(torch.nn.functional.silu(x) * x)
        return torch.softmax(logits.float(), dim=-1)


def main() -> None:
    import kiln
    from kiln.workers import torch_internals
    from kiln.workers.config import CompilationConfig

    torch.manual_seed(0)
    model = RMSNormSoftmax().cuda().eval()
    root = json.loads(sys.argv[1])["root"]
    compiled = kiln.compile(model, CompilationConfig(compile_sizes=COMPILE_SIZES), cache_root=root)
    weights = torch.linspace(0, 1, VOCAB, device="cuda", dtype=torch.float64)  # softmax rows sum to 1
    outputs = {}
    with torch_internals.count_autotune_benchmarks() as tuned:
        for n in SIZES:
            x = torch.randn(n, HIDDEN, device="cuda", generator=torch.Generator("cuda").manual_seed(n))
            outputs[n] = (compiled(x).double() * weights).sum(-1).tolist()
        torch.cuda.synchronize()
    rec = compiled.record
    print(json.dumps({"benchmarks": tuned.calls, "record_benchmarks": rec.autotune_benchmarks,
                      "compiles": rec.inductor_compiles, "hits": rec.cache_hits, "loaded": rec.artifacts_loaded,
                      "warnings": rec.warnings, "outputs": outputs}))


if __name__ == "__main__":
    main()
