"""Child of the invalidation matrix: the key factors of the matrix's scene in a fresh process.

    python key_child.py '{"files": [...]}'

Prints one JSON line, {"factors": ...}: cache_key_factors of the default config, the given
traced files and the CPU (Inductor's source key stubbed, see below). The parent starts it with the environment a row changes, since torch
reads TORCHINDUCTOR_*, ATEN_CPU_CAPABILITY and OMP_NUM_THREADS when it is imported.
"""

from __future__ import annotations

import json
import sys
import warnings


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    from kiln.workers import torch_internals
    from kiln.workers.compilation.factors import cache_key_factors
    from kiln.workers.config import CompilationConfig

    # Inductor's source key hashes torch's installed files (a second of CPU per process) and
    # reads no environment; every child gets the same stand-in, so no row can move it.
    torch_internals.inductor_source_key = lambda: "the same in every child"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config_hash = CompilationConfig().compute_hash()
    factors, _ = cache_key_factors(config_hash, spec["files"], torch.device("cpu"))
    print(json.dumps({"factors": factors}))


if __name__ == "__main__":
    main()
