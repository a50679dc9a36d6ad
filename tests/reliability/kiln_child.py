"""Child process of the reliability tests: compile the example model in-process, maybe faultily.

    python kiln_child.py '{"root": ..., "model": {...}, "sizes": [2], "check_sizes": [1, 2, 3],
                           "config": {...}, "fault": {...}, "compiler_factors": {...}}'

Runs KilnModel (what a worker runs) against a CacheStore at "root" and prints one JSON line:
{"record": ..., "max_err": ..., "key": ...}, where max_err is the largest difference between
kiln's outputs and eager outputs at "check_sizes" (proof that nothing corrupt was executed).

Faults, for the test to SIGKILL the process at a known point (it waits for "marker"):
  {"at": "compile", "nth": N, "marker": PATH}     the Nth Inductor compile touches the marker
                                                   and sleeps instead of compiling
  {"at": "blob_write", "nth": N, "marker": PATH}   the Nth artifact write stops half-way (the
                                                   temporary file holds half the bytes), touches
                                                   the marker and sleeps
"compiler_factors" overrides entries of the toolchain factors (a cache from another build).

Logging is deliberately left unconfigured: what kiln warns must reach stderr on its own.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _sleep_forever(marker: str) -> None:
    Path(marker).touch()
    time.sleep(3600)  # the test kills us here


def inject_compile_fault(nth: int, on_fault: Callable[[], None]) -> None:
    """Call `on_fault` at the start of the Nth Inductor compile of this process."""
    import kiln.workers.compilation.piecewise_backend as compiler

    real = compiler.compile_graph
    calls = 0

    def compile_graph(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth:
            on_fault()
        return real(*args, **kwargs)

    compiler.compile_graph = compile_graph


def inject_blob_write_fault(nth: int, on_fault: Callable[[], None]) -> None:
    """Call `on_fault` half-way through the Nth artifact write of this process (the temporary
    file holding half the bytes, fsynced)."""
    import kiln.cache.atomic as atomic
    import kiln.cache.store as store

    real_write, real_write_all = store.atomic_write_bytes, atomic._write_all
    state = {"blobs": 0, "armed": False}

    def atomic_write_bytes(path, data):
        # Only artifact writes count: key_factors.json, refs and indexes go through here too.
        if Path(path).parent.name == "blobs":
            state["blobs"] += 1
            state["armed"] = state["blobs"] == nth
        return real_write(path, data)

    def write_all(fd, view):
        if state["armed"]:
            real_write_all(fd, view[: len(view) // 2])
            os.fsync(fd)
            on_fault()
        return real_write_all(fd, view)

    store.atomic_write_bytes = atomic_write_bytes
    atomic._write_all = write_all


def override_compiler_factors(overrides: dict) -> None:
    import kiln.workers.compilation.factors as factors

    real = factors.compiler_factors
    factors.compiler_factors = lambda device: {**real(device), **overrides}


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    from kiln.cache import CacheStore
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    fault = spec.get("fault")
    if fault:
        inject = {"compile": inject_compile_fault, "blob_write": inject_blob_write_fault}[fault["at"]]
        inject(fault["nth"], lambda: _sleep_forever(fault["marker"]))
    if spec.get("compiler_factors"):
        override_compiler_factors(spec["compiler_factors"])

    config = CompilationConfig(**spec.get("config", {}))
    with building_with(config):
        model = build(**spec["model"])
    eager = build(**spec["model"])
    store = CacheStore(spec["root"]) if spec.get("root") else None
    kiln = KilnModel(model, config, store=store)
    record = kiln.compile(spec.get("sizes", [2]))
    max_err = 0.0
    with torch.no_grad():
        for n in spec.get("check_sizes", [1, 2, 3]):
            model.reset_cache()
            eager.reset_cache()
            inputs = model.example_inputs(n)
            max_err = max(max_err, (kiln(*inputs) - eager(*inputs)).abs().max().item())
    print(json.dumps({"record": record.to_dict(), "max_err": max_err, "key": record.cache_key}))


if __name__ == "__main__":
    main()
