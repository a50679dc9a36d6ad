"""Child process for backend tests: compile the example model and print one JSON line.

    python compile_child.py '{"root": ..., "layers": 2, "config": {...}, "sizes": [...]}'

Prints {"record": ..., "outputs": {size: [floats]}, "builds": [...]} where builds lists every
C++ compile Inductor started in this process (proof that a warm start compiled nothing).
"""

from __future__ import annotations

import json
import sys

import torch
import torch._inductor.cpp_builder as cpp_builder

BUILDS: list[str] = []
_build = cpp_builder.CppBuilder.build


def _counting_build(self, *args, **kwargs):
    BUILDS.append(self.get_target_file_path())
    return _build(self, *args, **kwargs)


cpp_builder.CppBuilder.build = _counting_build


def main() -> None:
    spec = json.loads(sys.argv[1])
    from kiln.cache import CacheStore
    from examples.toy_llama import build
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    config = CompilationConfig(**spec.get("config", {}))
    with building_with(config):
        model = build(**spec.get("model", {}))
    store = CacheStore(spec["root"]) if spec.get("root") else None
    kiln = KilnModel(model, config, store=store)
    record = kiln.compile(spec.get("sizes", [4]))
    outputs = {}
    for n in spec.get("check_sizes", [1, 3, 4]):
        model.reset_cache()
        out = kiln(*model.example_inputs(n))
        outputs[n] = out.double().sum(-1).tolist()
    print(json.dumps({"record": record.to_dict(), "outputs": outputs, "builds": BUILDS}))


if __name__ == "__main__":
    main()
