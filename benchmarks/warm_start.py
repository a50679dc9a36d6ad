"""Time to first output, cold and warm: kiln beside plain torch.compile with its own caches.

    python benchmarks/warm_start.py [--out results.json]            # CPU: tiny models
    python benchmarks/warm_start.py --gpu [--out results.json]      # one GPU: 1B and 8B shapes

Every variant runs in a fresh process, twice on one cache directory: cold (empty) then warm.
All children share compiled bytecode (`prime_bytecode`), as on a machine where pip wrote .pyc.
"first output s" runs from the child's start (imports included) to the first output on the
host; "compile s" is the part the cache replaces (trace + compile cold, trace + load warm).

- kiln.compile / torch.compile on a transformers Llama (CPU: 3 tiny layers; GPU: the
  Llama-3.2-1B shape, bf16, random weights). torch.compile warm keeps its FX graph and
  AOTAutograd caches (TORCHINDUCTOR_CACHE_DIR, the same for cold and warm); kiln's warm start
  gets only kiln's cache (its Inductor cache dir is fresh each run; its Triton cache dir, where
  kiln never puts a kernel, keeps Triton's driver stubs as any machine does).
- `kiln warmup` of the example model (CPU, TP=1) or the Llama-3.1-8B zoo model (GPU, dummy
  weights, TP=1, 35 capture sizes; warm with eager and with lazy capture): whole command and,
  per rank, the worker's time to ready and its trace/compile/load/capture seconds.

Targets (issue 15): kiln warm ≤ 5 % of kiln cold, and below torch.compile warm; on the GPU,
warm trace + load ≤ 5 % of cold trace + compile, and warm time to ready with lazy capture ≤ 3 s
after the worker starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                   num_hidden_layers=16, vocab_size=128256, max_position_embeddings=2048, head_dim=64,
                   tie_word_embeddings=True, rope_theta=500000.0)
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
            num_hidden_layers=3, vocab_size=64, max_position_embeddings=64)


# ---- bytecode ---------------------------------------------------------------------------------


def prime_bytecode(work: str) -> None:
    """Give every child compiled bytecode, as an installed machine has.

    A site-packages without .pyc files that Python cannot write to (read-only images, such as
    the GPU machines kiln is measured on) makes every process compile torch's modules from
    source again: seconds per start, for kiln and for torch.compile alike, that no user with a
    normal install pays. So all children share one PYTHONPYCACHEPREFIX, filled by one unmeasured
    process that imports what the variants import before any variant runs.
    """
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # set on the GPU machines: nothing would be written
    code = ("import torch, torch._dynamo, torch._inductor.compile_fx, torch._inductor.select_algorithm, transformers;"
            "from transformers import LlamaForCausalLM; import kiln, kiln.workers.worker, kiln.orchestrator.cli;"
            "import ray")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=600)
    print(f"# bytecode primed in {time.perf_counter() - t0:.1f} s ({os.environ['PYTHONPYCACHEPREFIX']})", flush=True)


# ---- child: one variant, one process ------------------------------------------------------------


def child(spec: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = spec["gpu"]
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = LlamaConfig(**(LLAMA_32_1B if gpu else TINY), attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (4, 16), device=device)
    t_built = time.perf_counter()
    facts: dict = {}
    profile = None
    if spec.get("profile"):
        from kiln.workers import profiling

        profile = profiling.start()
    if spec["variant"] == "kiln":
        import kiln

        compiled = kiln.compile(model, cache_root=spec["root"])
        out = compiled(ids, use_cache=False).logits
        rec = compiled.record
        facts = {"inductor_compiles": rec.inductor_compiles, "cache_hits": rec.cache_hits,
                 "trace_cache": rec.trace_cache,
                 "by_kind": {k: sum(p.seconds for p in rec.phases if p.kind == k)
                             for k in ("setup", "trace", "compile", "load", "run")}}
    else:
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(ids, use_cache=False).logits
    if gpu:
        torch.cuda.synchronize()
    first = time.perf_counter()
    if profile is not None:
        profiling.write(profile, spec["profile"])
    print(json.dumps({"first_output_s": first - START, "compile_s": first - t_built,
                      "checksum": out.float().sum().item(), **facts}))


def run_child(spec: dict, env: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if run.returncode:
        raise RuntimeError(f"{spec}: exit {run.returncode}\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compile_variants(gpu: bool, work: str, profile_dir: str | None = None) -> list[dict]:
    rows = []
    for variant in ("kiln", "torch.compile"):
        root = os.path.join(work, variant)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if variant == "torch.compile":
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")  # kept: its warm caches
        results = {}
        if variant == "kiln":
            # Triton's own driver stubs (built once per machine) may stay; kiln compiles and loads
            # its kernels with Triton pointed at its private directories, so no kernel lands here.
            env["TRITON_CACHE_DIR"] = os.path.join(root, "triton-driver")
        for label in ("cold", "warm"):
            if variant == "kiln":  # only kiln's own cache may help kiln: no Inductor cache
                env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(dir=work, prefix="inductor-")
            spec = {"variant": "kiln" if variant == "kiln" else "torch", "gpu": gpu, "root": root}
            if profile_dir and label == "warm":  # where a warm start goes, function by function
                spec["profile"] = os.path.join(profile_dir, f"{spec['variant']}-warm")
            results[label] = run_child(spec, env)
            print(f"# {variant} {label}: {json.dumps(results[label])}", flush=True)
        rows.append({"variant": f"{variant} ({'Llama-3.2-1B shape' if gpu else 'tiny Llama, 3 layers'})",
                     **results})
    return rows


# ---- kiln warmup through the driver -------------------------------------------------------------


def _rank_facts(report_path: str) -> dict:
    with open(report_path) as f:
        report = json.load(f)
    rank = report["ranks"][0]
    by_kind: dict[str, float] = {}
    for phase in rank["phases"]:
        by_kind[phase["kind"]] = by_kind.get(phase["kind"], 0.0) + phase["seconds"]
    starts = [p["start"] for p in rank["phases"]]
    return {"ready_s": rank["wall_seconds"], "by_kind": by_kind, "trace_cache": rank.get("trace_cache", ""),
            "inductor_compiles": rank["inductor_compiles"], "phases_from_first_s": max(
                p["end"] for p in rank["phases"]) - min(starts) if starts else 0.0,
            "lazy_capture": rank.get("lazy_capture")}


def warmup_variants(gpu: bool, work: str, profile_dir: str | None = None) -> list[dict]:
    root = os.path.join(work, "warmup-cache")
    if gpu:
        sys.path.insert(0, ROOT)
        from benchmarks.real_model_decode import write_checkpoint_dir

        model = write_checkpoint_dir(work)
        extra = ["--model-arg", "load_format=dummy", "--model-arg", "dtype=bfloat16",
                 "--model-arg", "max_seqs=64", "--model-arg", "max_seq_len=192"]
        name = "kiln warmup (Llama-3.1-8B, 35 sizes)"
    else:
        model, extra, name = "examples/toy_llama.py:build", ["--sizes", "1,2,4,8"], "kiln warmup (example model)"
    rows = []
    for label, capture in (("cold", "eager"), ("warm", "eager"), ("warm lazy", "lazy")):
        report = os.path.join(work, f"warmup-{label.replace(' ', '-')}.json")
        cmd = [sys.executable, "-m", "kiln", "warmup", model, "--tp", "1", "--cache-root", root, *extra,
               "--cudagraph-capture", capture, "--report", report, "--quiet"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(dir=work, prefix="inductor-"))
        if profile_dir and label != "cold":  # each rank's cProfile, actor start to ready
            env["KILN_PROFILE_DIR"] = os.path.join(profile_dir, f"warmup-{label.replace(' ', '-')}")
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
        if run.returncode:
            raise RuntimeError(f"{label}: exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
        rows.append({"variant": name, "label": label, "command_s": time.perf_counter() - t0,
                     **_rank_facts(report)})
        print(f"# warmup {label}: {json.dumps(rows[-1])}", flush=True)
        if not gpu and label == "warm":
            break  # no CUDA graphs on the CPU: lazy capture has nothing to capture
    return rows


# ---- table --------------------------------------------------------------------------------------


def table(compile_rows: list[dict], warmup_rows: list[dict]) -> str:
    lines = [f"{'variant':44} {'cold s':>8} {'warm s':>8} {'warm/cold':>9} {'cold cmp':>9} {'warm cmp':>9}  warm trace"]
    for r in compile_rows:
        c, w = r["cold"], r["warm"]
        lines.append(f"{r['variant']:44} {c['first_output_s']:8.2f} {w['first_output_s']:8.2f} "
                     f"{w['first_output_s'] / c['first_output_s']:9.3f} {c['compile_s']:9.2f} {w['compile_s']:9.2f}  "
                     f"{w.get('trace_cache', '-')}")
    lines.append("")
    lines.append(f"{'kiln warmup':44} {'command':>8} {'ready':>8} {'trace':>7} {'compile':>8} {'load':>7} "
                 f"{'capture':>8} {'compiles':>8}  trace")
    for r in warmup_rows:
        k = r["by_kind"]
        lines.append(f"{r['variant'] + ', ' + r['label']:44} {r['command_s']:8.2f} {r['ready_s']:8.2f} "
                     f"{k.get('trace', 0):7.2f} {k.get('compile', 0):8.2f} {k.get('load', 0):7.2f} "
                     f"{k.get('capture', 0):8.2f} {r['inductor_compiles']:8d}  {r['trace_cache']}")
    if len(warmup_rows) >= 2:
        cold, warm = warmup_rows[0]["by_kind"], warmup_rows[1]["by_kind"]
        cold_tc = cold.get("trace", 0) + cold.get("compile", 0)
        warm_tl = warm.get("trace", 0) + warm.get("load", 0)
        lines.append(f"warm trace+load / cold trace+compile: {warm_tl:.2f} / {cold_tc:.2f} s = "
                     f"{warm_tl / cold_tc if cold_tc else float('nan'):.3f} (target <= 0.05)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--gpu", action="store_true", help="the GPU shapes (Llama-3.2-1B, Llama-3.1-8B)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", choices=("compile", "warmup"), help="run one half")
    parser.add_argument("--profile", metavar="DIR", help="profile the warm children (cProfile) into DIR")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory(prefix="kiln-warm-start-") as work:
        prime_bytecode(work)
        compile_rows = compile_variants(args.gpu, work, args.profile) if args.only != "warmup" else []
        warmup_rows = warmup_variants(args.gpu, work, args.profile) if args.only != "compile" else []
    import platform

    import torch

    machine = torch.cuda.get_device_name() if args.gpu else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(f"machine: {machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(table(compile_rows, warmup_rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "compile": compile_rows,
                       "warmup": warmup_rows}, f, indent=2)


if __name__ == "__main__":
    main()
