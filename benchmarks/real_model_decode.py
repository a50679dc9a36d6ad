"""Decode-step latency of a real model's architecture: kiln beside what a user would pick instead.

    python benchmarks/real_model_decode.py --part kiln --out DIR          # kiln, the floor, kiln warmup
    python benchmarks/real_model_decode.py --part transformers --out DIR  # transformers static + eager
    python benchmarks/real_model_decode.py --combine DIR                  # one table from both

Llama-3.1-8B's architecture (its published config values), dummy weights, bf16, TP=1, one GPU.
Every variant decodes one token per sequence at `--context` tokens of context, batch 1/4/16/64:
- kiln: the zoo model through KilnModel, FULL_AND_PIECEWISE, 35 capture sizes (decode steps
  replay one full CUDA graph);
- transformers static: greedy `generate` with `cache_implementation="static"`, which
  transformers compiles itself (CUDA graphs); a step's time is the difference of two generate
  lengths over the difference of their token counts (prefill and compile cancel out);
- transformers eager: the same with the default dynamic cache and no compile;
- floor: the step's weight matmuls alone (every layer's QKV, O, gate/up, down and the LM head)
  captured in one CUDA graph with nothing else.
Also a cold and a warm `kiln warmup` of the model (Ray, 35 capture sizes) with the per-phase table.
The parts run in separate processes (device commands are limited to 10 minutes each).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, median_ms, print_table  # noqa: E402

# Llama-3.1-8B's published config values (weights are drawn, not loaded).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
BATCHES = (1, 4, 16, 64)


def write_checkpoint_dir(root: str) -> str:
    path = os.path.join(root, "llama-3.1-8b-config")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(LLAMA_31_8B, f, indent=2)
    return path


def weight_bytes(cfg: dict) -> int:
    """bf16 bytes of the weights one decode step multiplies by (all layers and the LM head)."""
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + h * 2 * i + i * h
    return 2 * (layers * per_layer + v * h)


# ---- kiln ------------------------------------------------------------------------------------


def run_kiln(args, out: dict) -> None:
    from kiln.cache import CacheStore
    from kiln.workers.config import DEFAULT_CAPTURE_SIZES, CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.models.loader import build
    from kiln.workers.runtime.kiln_model import KilnModel

    ckpt = write_checkpoint_dir(args.work)
    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    t0 = time.perf_counter()
    with building_with(config):
        model = build(ckpt, load_format="dummy", dtype="bfloat16", max_seqs=max(BATCHES),
                      max_seq_len=args.context + 64)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    kiln = KilnModel(model, config, store=CacheStore(os.path.join(args.work, "kiln-cache")))
    t0 = time.perf_counter()
    record = kiln.compile(list(DEFAULT_CAPTURE_SIZES))
    compile_s = time.perf_counter() - t0
    out["kiln_setup"] = {"build_s": build_s, "compile_and_capture_s": compile_s,
                         "inductor_compiles": record.inductor_compiles, "cudagraphs": kiln.cudagraph_status}
    rows = []
    with torch.no_grad():
        for b in BATCHES:
            ids = torch.arange(b, device="cuda") % 1000
            pos = torch.full((b,), args.context, device="cuda")
            seqs = torch.arange(b, device="cuda")
            ms = median_ms(lambda: kiln(ids, pos, seqs, decode=True), steps=args.steps)
            rows.append({"batch": b, "kiln_ms": ms})
    out["kiln"] = rows
    if args.profile:
        # Where a batch-1 step's GPU time goes: kernels of the replayed graph, by total time.
        ids, pos, seqs = (torch.zeros(1, dtype=torch.long, device="cuda"), torch.full((1,), args.context, device="cuda"),
                          torch.zeros(1, dtype=torch.long, device="cuda"))
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                kiln(ids, pos, seqs, decode=True)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
        print(table, flush=True)
        out["profile_b1"] = table
    del kiln, model
    gc.collect()
    torch.cuda.empty_cache()


def run_floor(args, out: dict) -> None:
    """The weight matmuls of one decode step alone, in one CUDA graph."""
    cfg = LLAMA_31_8B
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    hq, hkv, v = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    shapes = [((hq + 2 * hkv) * d, h), (h, hq * d), (2 * i, h), (h, i)] * cfg["num_hidden_layers"] + [(v, h)]
    weights = [torch.randn(s, dtype=torch.bfloat16, device="cuda") * 0.02 for s in shapes]
    rows = []
    for b in BATCHES:
        inputs = {k: torch.randn(b, k, dtype=torch.bfloat16, device="cuda") for k in {s[1] for s in shapes}}
        outs = [torch.empty(b, s[0], dtype=torch.bfloat16, device="cuda") for s in shapes]

        def step():
            for w, o in zip(weights, outs):
                torch.mm(inputs[w.shape[1]], w.t(), out=o)

        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = median_ms(graph.replay, steps=args.steps)
        rows.append({"batch": b, "floor_ms": ms, "floor_tb_s": weight_bytes(cfg) / ms / 1e9})
    out["floor"] = rows
    del weights
    torch.cuda.empty_cache()


def run_warmup_cli(args, out: dict) -> None:
    """Cold, then warm `kiln warmup` of the model: the per-phase table of each."""
    ckpt = write_checkpoint_dir(args.work)
    root = os.path.join(args.work, "warmup-cache")
    results = {}
    for label in ("cold", "warm"):
        report = os.path.join(args.out, f"warmup_{label}.json")
        cmd = [sys.executable, "-m", "kiln", "warmup", ckpt, "--tp", "1", "--cache-root", root,
               "--model-arg", "load_format=dummy", "--model-arg", "dtype=bfloat16",
               "--model-arg", f"max_seqs={max(BATCHES)}", "--model-arg", f"max_seq_len={args.context + 64}",
               "--report", report, "--quiet"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
        wall = time.perf_counter() - t0
        print(run.stdout[-3000:], run.stderr[-2000:] if run.returncode else "", flush=True)
        results[label] = {"returncode": run.returncode, "command_s": wall, "table": run.stdout[-3000:]}
    out["warmup_cli"] = results


# ---- transformers ---------------------------------------------------------------------------


def generate_step_ms(model, prompt: torch.Tensor, short: int, long: int, **kwargs) -> float:
    """ms per decode step of greedy `generate`: the difference of a long and a short generate over
    the difference of their token counts (prefill and compile cancel out); the first call compiles
    (static cache) and warms up."""

    def generate(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    generate(long)
    generate(short)
    t_short = min(generate(short) for _ in range(2))
    t_long = min(generate(long) for _ in range(2))
    return (t_long - t_short) / (long - short) * 1e3


def run_transformers(args, out: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA_31_8B.items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    short, long = args.hf_tokens
    rows = {b: {"batch": b} for b in BATCHES}
    for label, kwargs in (("hf_static_ms", {"cache_implementation": "static"}),
                          ("hf_eager_ms", {"disable_compile": True})):
        for b in BATCHES:
            prompt = torch.randint(0, 1000, (b, args.context), device="cuda")
            try:
                rows[b][label] = generate_step_ms(model, prompt, short, long, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report what failed, keep the other rows
                rows[b][label] = None
                out.setdefault("errors", []).append(f"{label} b={b}: {type(exc).__name__}: {exc}"[:500])
            print(label, rows[b], flush=True)
    out["transformers"] = list(rows.values())


# ---- table ----------------------------------------------------------------------------------


def combine(directory: str) -> None:
    parts = {}
    for name in ("kiln.json", "transformers.json"):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path) as f:
                parts[name] = json.load(f)
    kiln = parts.get("kiln.json", {})
    hf = parts.get("transformers.json", {})
    by_batch: dict[int, dict] = {b: {"batch": b} for b in BATCHES}
    for rows in (kiln.get("kiln", []), kiln.get("floor", []), hf.get("transformers", [])):
        for r in rows:
            by_batch[r["batch"]].update(r)
    table = []
    for b, r in by_batch.items():
        if r.get("kiln_ms") and r.get("floor_ms"):
            r["kiln_vs_floor"] = r["kiln_ms"] / r["floor_ms"]
        if r.get("kiln_ms") and r.get("hf_static_ms"):
            r["kiln_vs_hf_static"] = r["kiln_ms"] / r["hf_static_ms"]
        table.append(r)
    print(kiln.get("machine") or hf.get("machine"))
    print_table(table, ["batch", "kiln_ms", "hf_static_ms", "hf_eager_ms", "floor_ms", "floor_tb_s",
                        "kiln_vs_floor", "kiln_vs_hf_static"])
    for part in parts.values():
        for error in part.get("errors", []):
            print("error:", error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["kiln", "transformers"])
    parser.add_argument("--combine", metavar="DIR")
    parser.add_argument("--out", default=".")
    parser.add_argument("--context", type=int, default=128, help="tokens of context per sequence at decode")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hf-tokens", type=int, nargs=2, default=(8, 40), metavar=("SHORT", "LONG"))
    parser.add_argument("--no-warmup-cli", action="store_true")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile kiln's batch-1 step (kernel table)")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
        return
    if not torch.cuda.is_available():
        sys.exit("real_model_decode.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="kiln-bench-")
    out: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "context": args.context,
                 "weight_gb": weight_bytes(LLAMA_31_8B) / 1e9}
    if args.part == "kiln":
        run_kiln(args, out)
        if not args.no_floor:
            run_floor(args, out)
        if not args.no_warmup_cli:
            run_warmup_cli(args, out)
    else:
        run_transformers(args, out)
    with open(os.path.join(args.out, f"{args.part}.json"), "w") as f:
        json.dump(out, f, indent=2)
    combine(args.out)


if __name__ == "__main__":
    main()
