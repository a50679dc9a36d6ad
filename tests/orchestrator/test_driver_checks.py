"""Driver checks that need no Ray cluster: device choice, placement feasibility, argument and
state errors, the report's cache root, and `kiln warmup`'s --report/--trace checks. (The embedded
cluster and failure reports run for real in test_failure_paths.py.)"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.cli_warmup import warmup_command
from kiln.orchestrator.cluster import placement_shortfall, rank_bundle, wants_gpus

MODEL = "examples/toy_llama.py:build"
CPU = rank_bundle(False, 1)
GPU = rank_bundle(True, 1)


def test_auto_uses_gpus_only_when_every_rank_gets_one():
    assert wants_gpus("auto", 2, 2) and wants_gpus("auto", 8, 2)
    assert not wants_gpus("auto", 1, 2)  # would wait for a second GPU that never comes
    assert not wants_gpus("auto", 0, 1) and not wants_gpus("cpu", 8, 1)
    assert wants_gpus("cuda", 1, 2)  # asked for: the placement check reports the shortfall


def test_placement_shortfall_names_tp_strategy_and_resources():
    one_node = [{"CPU": 4.0, "GPU": 1.0}]
    problem = placement_shortfall(2, GPU, "PACK", one_node)
    assert "tp=2" in problem and "PACK" in problem and "room for 1 of the 2" in problem
    assert "1 node(s), 4 CPU and 1 GPU" in problem
    assert "room for 4 of the 8" in placement_shortfall(8, CPU, "PACK", one_node)
    assert placement_shortfall(4, CPU, "PACK", one_node) is None
    assert "STRICT_SPREAD needs 2 nodes" in placement_shortfall(2, CPU, "STRICT_SPREAD", one_node)


def test_placement_shortfall_per_strategy_on_two_nodes():
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert placement_shortfall(4, CPU, "PACK", nodes) is None
    assert placement_shortfall(4, CPU, "SPREAD", nodes) is None
    assert placement_shortfall(2, CPU, "STRICT_SPREAD", nodes) is None
    assert "STRICT_PACK needs one node" in placement_shortfall(4, CPU, "STRICT_PACK", nodes)
    assert "the cluster has 2" in placement_shortfall(3, CPU, "STRICT_SPREAD", nodes)
    # Fractional CPUs: 1.5 / 0.5 is 3 ranks, not 2 through float error.
    assert placement_shortfall(3, rank_bundle(False, 0.5), "STRICT_PACK", [{"CPU": 1.5}]) is None


def test_bad_placement_and_ignored_runtime_env():
    with pytest.raises(ValueError, match="placement must be one of PACK.*got 'pack'"):
        Orchestrator(MODEL, 1, placement="pack")
    with pytest.warns(UserWarning, match="runtime_env is ignored with address=None"):
        Orchestrator(MODEL, 1, runtime_env={"working_dir": "."})


def test_calls_before_warmup_are_refused():
    orch = Orchestrator(MODEL, 1, progress=False)
    for call in (orch.run, orch.reset_cache, lambda: orch.time_decode(1)):
        with pytest.raises(RuntimeError, match="needs a warm-up first"):
            call()


def test_second_warmup_with_other_sizes_is_refused():
    orch = Orchestrator(MODEL, 1, CompilationConfig(), progress=False)
    # As after a first warm-up of [1, 2, 4] (no workers: a repeat gathers nothing).
    orch.config = orch.config.model_copy(update={"cudagraph_capture_sizes": [1, 2, 4]})
    orch.started, orch.started_sizes = True, [1, 2, 4]
    with pytest.raises(ValueError, match=r"sizes \[1, 2\] differ from this Orchestrator's first warm-up"):
        orch.warmup([1, 2])
    assert orch.config.cudagraph_capture_sizes == [1, 2, 4]
    assert orch.warmup([4, 2, 1]).sizes == [1, 2, 4]  # the same sizes again are fine


def test_report_cache_root(monkeypatch, tmp_path):
    orch = Orchestrator(MODEL, 2, progress=False)
    # Ranks report <root>/<key>; a {node} root gives one root per node.
    ranks = [{"cache_dir": "/r/node-a/key1"}, {"cache_dir": "/r/node-b/key1/"}, {"cache_dir": "/r/node-a/key1"}]
    assert orch._report_cache_root(ranks) == "/r/node-a, /r/node-b"
    monkeypatch.setenv("KILN_CACHE_ROOT", str(tmp_path))
    assert orch._report_cache_root([{"cache_dir": ""}]) == str(tmp_path)  # what workers default to
    monkeypatch.delenv("KILN_CACHE_ROOT")
    assert orch._report_cache_root([]).endswith("/.cache/kiln") and "~" not in orch._report_cache_root([])


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click 8.1
    except TypeError:
        return CliRunner()


@pytest.mark.parametrize("option", ["--report", "--trace"])
def test_unwritable_output_path_is_refused_before_the_warmup(tmp_path, option, monkeypatch):
    import kiln.orchestrator.driver as driver

    def never(*args, **kwargs):
        raise AssertionError("the warm-up started despite a bad output path")

    monkeypatch.setattr(driver, "Orchestrator", never)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    result = _runner().invoke(warmup_command, [MODEL, option, str(blocker / "out.json")])
    assert result.exit_code == 2
    assert option in result.output + getattr(result, "stderr", "")
    assert "not a directory" in result.output + getattr(result, "stderr", "")


@pytest.mark.parametrize("args, expected", [([], "eager"), (["--cudagraph-capture", "lazy"], "lazy"),
                                            (["--set", "cudagraph_capture=lazy"], "lazy")])
def test_cudagraph_capture_flag_reaches_the_config(args, expected, monkeypatch):
    import kiln.orchestrator.driver as driver

    seen = {}

    def capture(model, tp_size, config, *args, **kwargs):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(driver, "Orchestrator", capture)
    _runner().invoke(warmup_command, [MODEL, *args])
    assert seen["config"].cudagraph_capture == expected


def test_root_causes_prefer_deaths_then_own_errors_over_knock_on_failures():
    from kiln.orchestrator.driver import root_causes

    died = {"rank": 1, "phase": "warmup", "cause": "worker process died (killed, out of memory, or its node was lost)"}
    peer = {"rank": 0, "phase": "warmup", "cause": "DistBackendError: [gloo] Connection closed by peer"}
    own = {"rank": 2, "phase": "build_model", "cause": "ValueError: bad shape"}
    assert root_causes([peer, died]) == [died]  # the peer's error arrived first
    assert root_causes([peer, own]) == [own]
    assert root_causes([peer]) == [peer]  # nothing better: the first failure as it is
