"""Child process: kiln.compile a tiny transformers Llama and print one JSON line.

    python hf_compile_child.py '{"root": ..., "layers": 2, "batch": 3}'

Prints {"record": ..., "logits_sum": float, "builds": [...], "dynamo_graphs": n} where builds
lists every C++ compile Inductor started in this process (none in a warm start) and
dynamo_graphs counts the graphs Dynamo traced (none when the cached trace served).
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
    import kiln
    from kiln.workers import torch_internals
    from tests.backend.hf_llama import tiny_llama, token_batch

    compiled = kiln.compile(tiny_llama(spec["layers"]), cache_root=spec["root"])
    logits = compiled(token_batch(spec["batch"]), use_cache=False).logits
    print(json.dumps({"record": compiled.record.to_dict(), "logits_sum": logits.double().sum().item(),
                      "builds": BUILDS, "dynamo_graphs": torch_internals.dynamo_graphs_traced()}))


if __name__ == "__main__":
    main()
