"""Piecewise compile of the example model through the cache: cold, warm, dedup, corruption.

Every compile runs in a child process (compile_child.py) with empty Inductor and Triton cache
directories, so "compiled nothing" is measured, not assumed.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.backend.conftest import run_child

SIZES = [4]  # capture sizes; compile_sizes expands to them
CONFIG = {"compile_sizes": ["cudagraph_capture_sizes"]}


def eager_sums(layers: int, sizes) -> dict[str, list[float]]:
    from examples.toy_llama import build

    model = build(layers=layers)
    out = {}
    for n in sizes:
        model.reset_cache()
        out[str(n)] = model(*model.example_inputs(n)).double().sum(-1).tolist()
    return out


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(torch.tensor(got[n]), torch.tensor(want[n]), rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def cold(module_tmp):
    root = module_tmp / "root"
    result = run_child({"root": str(root), "config": CONFIG, "sizes": SIZES,
                        "check_sizes": [1, 3, 4, 7]}, module_tmp)
    return root, result


def test_cold_compile_matches_eager_and_counts(cold):
    _, result = cold
    rec = result["record"]
    # 2 layers -> 2L+1 = 5 pieces: 2 attention (eager), 3 compiled, all 3 distinct
    assert rec["pieces_total"] == 5 and rec["pieces_splitting"] == 2 and rec["pieces_compiled"] == 3
    assert rec["unique_pieces"] == 3
    # symbolic + size 4 per unique piece
    assert rec["inductor_compiles"] == 6 and rec["cache_misses"] == 6 and rec["artifacts_saved"] == 6
    # Positive control for the warm start's "no C++ compile": the counter sees a cold run's.
    assert result["builds"], "the cold compile ran no C++ build the counter saw"
    assert rec["traced_files"] and all(not f.startswith("/") for f in rec["traced_files"])
    assert "examples/toy_llama.py" in rec["traced_files"]
    # sizes 1, 3, 7 run the symbolic artifact, 4 its own
    assert_close(result["outputs"], eager_sums(2, [1, 3, 4, 7]))


def test_warm_process_compiles_nothing(cold, module_tmp):
    root, first = cold
    result = run_child({"root": str(root), "config": CONFIG, "sizes": SIZES,
                        "check_sizes": [1, 3, 4, 7]}, module_tmp)
    rec = result["record"]
    assert rec["inductor_compiles"] == 0 and rec["cache_misses"] == 0
    assert rec["cache_hits"] == 6 and rec["artifacts_loaded"] == 6
    # The rank's six artifacts came off disk together, ahead of the pieces' loads.
    prefetch = [p for p in rec["phases"] if p["name"] == "prefetch"]
    assert len(prefetch) == 1 and prefetch[0]["extra"]["blobs"] == 6
    assert result["builds"] == [], "a warm start ran the C++ compiler"
    assert rec["cache_key"] == first["record"]["cache_key"]
    assert_close(result["outputs"], first["outputs"])


def test_deeper_model_reuses_identical_layers(cold, module_tmp):
    root, _ = cold
    # Same root: the 6-layer model's pieces are the 2-layer model's pieces.
    result = run_child({"root": str(root), "config": CONFIG, "sizes": SIZES,
                        "model": {"layers": 6}, "check_sizes": [3]}, module_tmp)
    rec = result["record"]
    assert rec["pieces_total"] == 13 and rec["inductor_compiles"] == 0
    assert rec["unique_pieces"] == 3
    # 5 middle pieces share one artifact per size: 4 repeats x 2 sizes come from memory
    assert rec["memory_dedup_hits"] == 8
    assert_close(result["outputs"], eager_sums(6, [3]))


def test_inductor_compiles_independent_of_depth(cold, module_tmp):
    _, shallow = cold
    deep = run_child({"root": str(module_tmp / "deep-root"), "config": CONFIG, "sizes": SIZES,
                      "model": {"layers": 6}, "check_sizes": [3]}, module_tmp)
    assert deep["record"]["inductor_compiles"] == shallow["record"]["inductor_compiles"]


def test_moved_root_with_a_corrupt_blob_recompiles_only_that(cold, module_tmp):
    root, first = cold
    moved = module_tmp / "moved-root"
    shutil.copytree(root, moved)
    key = first["record"]["cache_key"]
    blob = sorted((moved / key / "blobs").iterdir())[0]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run_child({"root": str(moved), "config": CONFIG, "sizes": SIZES,
                        "check_sizes": [1, 3, 4, 7]}, module_tmp)
    rec = result["record"]
    assert rec["cache_key"] == key, "a moved root must keep its key"
    assert rec["inductor_compiles"] == 1 and rec["cache_hits"] == 5
    assert list((moved / key / "quarantine").iterdir()), "the corrupt blob was not quarantined"
    assert_close(result["outputs"], first["outputs"])


def test_config_fields_that_matter_miss_and_others_hit(module_tmp):
    root = str(module_tmp / "fields-root")
    one_layer = {"layers": 1}
    base = run_child({"root": root, "model": one_layer, "sizes": [2], "check_sizes": [2]}, module_tmp)
    assert base["record"]["inductor_compiles"] == 2  # first and last piece, symbolic only
    irrelevant = {"debug_dump_path": str(module_tmp / "dump"), "cudagraph_num_of_warmups": 3,
                  "cudagraph_capture_sizes": [1, 2, 8], "cache_dir": "elsewhere"}
    same = run_child({"root": root, "model": one_layer, "config": irrelevant, "sizes": [2],
                      "check_sizes": [2]}, module_tmp)
    assert same["record"]["cache_hits"] == 2 and same["record"]["inductor_compiles"] == 0
    assert (module_tmp / "dump" / "rank_0" / "split_graph.py").is_file()
    changed = run_child({"root": root, "model": one_layer, "sizes": [2], "check_sizes": [2],
                         "config": {"pass_config": {"enable_noop": False}}}, module_tmp)
    assert changed["record"]["cache_key"] != base["record"]["cache_key"]
    assert changed["record"]["inductor_compiles"] == 2 and changed["record"]["cache_hits"] == 0
    assert_close(changed["outputs"], base["outputs"])
