"""Decode-step latency of a mixture-of-experts model: kiln beside transformers, against the floor.

    python benchmarks/moe_decode.py --part kiln --out DIR [--profile]  # kiln, routing, the floors
    python benchmarks/moe_decode.py --part kiln --triton-max-rows 0 --tag grouped --no-floor --out DIR
                                                                   # kiln with grouped matmuls only
    python benchmarks/moe_decode.py --part op --out DIR            # the experts alone: Triton vs grouped
    python benchmarks/moe_decode.py --part transformers --out DIR  # transformers eager + static
    python benchmarks/moe_decode.py --part warmup --out DIR        # cold and warm `kiln warmup`
    python benchmarks/moe_decode.py --combine DIR                  # one table from the parts

Qwen3-30B-A3B's architecture (its published config values: 48 layers, 128 experts of which 8 per
token, expert intermediate 768, hidden 2048, 32 query / 4 KV heads of 128), dummy weights
(~61 GB in bf16, drawn on the GPU), bf16, TP=1, one GPU. Each variant decodes one token per
sequence at `--context` tokens of context, batch 1/8/64:
- kiln: the zoo model through KilnModel, FULL_AND_PIECEWISE (decode steps replay one full CUDA
  graph; experts through kiln::moe_routed: its Triton kernels up to --triton-max-rows rows,
  torch's grouped matmuls above); --profile: torch.profiler over replays of the batch-1 and -8
  steps, a kernel table grouped into dense matmuls, experts, routing, attention, norm, other
  (profile_kiln_b{N}.txt beside the JSON);
- op: one layer's experts alone at the model's shapes (kiln::moe_routed's Triton kernels, the
  same op on the grouped matmuls, and kiln::moe_experts' two paths on sorted rows) at 1..64
  tokens (8..512 rows), over 8 layers' weights in one CUDA graph (so L2 holds none), and the
  Triton kernels' block sizes: what sets moe_triton's defaults and its row limit;
- routing: the distinct experts a decode step touches per layer (measured with the same weights
  and inputs; at most min(128, 8·batch)), which set the active weight bytes;
- floor: the step's weight matmuls alone in one CUDA graph: every layer's QKV, O and router, the
  active experts' gate/up and down (batched matmuls over that many experts, the step's k·batch
  rows spread evenly) and the LM head; and the dense part alone (everything but the experts);
- transformers: greedy `generate` with its static cache (which it compiles itself) and eagerly
  with its dynamic cache, its default experts implementation (grouped_mm where torch has it);
- warmup: a cold and a warm `kiln warmup` of the model with its per-phase table.
Achieved bandwidth: the active weight bytes of a step over its time. Each part fits one 10-minute
device command (--batches and --hf-variants run a subset; transformers' part stops starting new
measurements after --hf-budget-s and records why each skipped batch was skipped). Every part
rewrites its JSON after each measurement, so a part cut off by a time limit keeps what it got.
benchmarks/moe_device_run.sh runs the tests and all parts in one device command.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, median_ms, print_table  # noqa: E402
from benchmarks.real_model_decode import generate_step_ms  # noqa: E402

# Qwen3-30B-A3B's published config.json values (weights are drawn, not loaded).
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
}
BATCHES = (1, 8, 64)
CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64)


def write_checkpoint_dir(root: str) -> str:
    path = os.path.join(root, "qwen3-30b-a3b-config")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(QWEN3_30B_A3B, f, indent=2)
    return path


def dense_bytes(cfg: dict) -> int:
    """bf16 bytes of the weights every decode step multiplies by: attention, routers, LM head."""
    h, layers, v, e = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["num_experts"]
    d, hq, hkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return 2 * (layers * (h * (hq + 2 * hkv) * d + hq * d * h + e * h) + v * h)


def expert_bytes(cfg: dict, experts_per_layer: float) -> float:
    """bf16 bytes of `experts_per_layer` experts' gate, up and down matrices in every layer."""
    return 2 * cfg["num_hidden_layers"] * experts_per_layer * 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]


def save(args, out: dict) -> None:
    """The part's JSON as it stands (rewritten after each measurement)."""
    with open(os.path.join(args.out, args.json_name), "w") as f:
        json.dump(out, f, indent=2)


def decode_batch(b: int, context: int) -> tuple[torch.Tensor, ...]:
    ids = (torch.arange(b, device="cuda") * 7919) % 150000  # distinct tokens: distinct routes
    return ids, torch.full((b,), context, device="cuda"), torch.arange(b, device="cuda")


# ---- kiln ------------------------------------------------------------------------------------


def measure_routing(model, args) -> dict[int, dict]:
    """Distinct experts per layer that a decode step of each batch touches (eager forward, the
    same weights and inputs as kiln's step)."""
    from kiln.workers.layers.moe import SparseMoE

    top_k = QWEN3_30B_A3B["num_experts_per_tok"]
    seen: list[int] = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, logits: seen.append(
        int(logits.topk(top_k, dim=-1).indices.unique().numel()))) for m in model.modules() if isinstance(m, SparseMoE)]
    out = {}
    with torch.no_grad():
        for b in args.batches:
            seen.clear()
            model(*decode_batch(b, args.context))
            bound = min(QWEN3_30B_A3B["num_experts"], top_k * b)
            out[b] = {"mean": sum(seen) / len(seen), "max": max(seen), "bound": bound}
    for hook in hooks:
        hook.remove()
    model.reset_cache()
    return out


def run_kiln(args, out: dict) -> None:
    from kiln.cache import CacheStore
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.models.loader import build
    from kiln.workers.runtime.kiln_model import KilnModel

    ckpt = write_checkpoint_dir(args.work)
    config = CompilationConfig(cudagraph_mode="FULL_AND_PIECEWISE", cudagraph_copy_inputs=True)
    t0 = time.perf_counter()
    with building_with(config):
        model = build(ckpt, load_format="dummy", dtype="bfloat16", max_seqs=max(CAPTURE_SIZES),
                      max_seq_len=args.context + 64)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    out["routing"] = measure_routing(model, args)
    print("routing (distinct experts per layer):", out["routing"], flush=True)
    kiln = KilnModel(model, config, store=CacheStore(args.cache_dir or os.path.join(args.work, "kiln-cache")))
    t0 = time.perf_counter()
    record = kiln.compile(list(CAPTURE_SIZES))
    compile_s = time.perf_counter() - t0
    out["kiln_setup"] = {"build_s": build_s, "compile_and_capture_s": compile_s, "unique_pieces": record.unique_pieces,
                         "inductor_compiles": record.inductor_compiles, "cudagraphs": kiln.cudagraph_status}
    print(out["kiln_setup"], flush=True)
    rows: list[dict] = []
    out["kiln"] = rows
    with torch.no_grad():
        for b in args.batches:
            inputs = decode_batch(b, args.context)
            rows.append({"batch": b, "kiln_ms": median_ms(lambda: kiln(*inputs, decode=True), steps=args.steps)})
            print(rows[-1], flush=True)
            save(args, out)
        if args.profile:  # where a step's GPU time goes: the replayed graph's kernels
            for b in (b for b in PROFILE_BATCHES if b in args.batches):
                inputs = decode_batch(b, args.context)
                out[f"profile_b{b}"] = profile_step(lambda: kiln(*inputs, decode=True), b, args)
                save(args, out)
    save(args, out)
    del kiln, model
    gc.collect()
    torch.cuda.empty_cache()


# Kernel-name patterns of each category, tried in this order (names lower-cased); the rest: other.
KERNEL_CATEGORIES = (
    ("experts-triton", ("_gate_up_silu_kernel", "_down_kernel")),
    ("experts-grouped-mm", ("group", "silu")),  # CUTLASS grouped GEMM; the SiLU-mul between the two
    ("attention", ("attention", "_write_kv_kernel", "flash", "fmha")),
    ("routing", ("topk", "sort", "softmax", "searchsorted", "scatter", "gather", "index", "bitonic", "cumsum",
                 "bincount", "radix")),
    ("norm", ("rsqrt", "norm", "mean")),
    ("matmul-dense", ("gemm", "gemv", "nvjet", "cublas", "xmma", "cutlass", "splitk", "matmul", "_mm_")),
)
PROFILE_BATCHES = (1, 8)
PROFILE_STEPS = 5


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, patterns in KERNEL_CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def profile_step(step, batch: int, args) -> dict:
    """torch.profiler (CUDA activity) over PROFILE_STEPS replays of a decode step: each kernel's
    calls and GPU µs per step, and the categories' totals and shares; printed, written to
    profile_kiln_b{batch}.txt, returned for the JSON."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0:
            kernels.append({"name": e.key, "category": kernel_category(e.key), "calls": e.count / PROFILE_STEPS,
                            "us": us / PROFILE_STEPS})
    kernels.sort(key=lambda k: -k["us"])
    total = sum(k["us"] for k in kernels) or 1.0
    categories: dict[str, dict] = {}
    for k in kernels:
        c = categories.setdefault(k["category"], {"category": k["category"], "kernels": 0, "calls": 0.0, "us": 0.0})
        c["kernels"] += 1
        c["calls"] += k["calls"]
        c["us"] += k["us"]
    for c in categories.values():
        c["share"] = c["us"] / total
    cats = sorted(categories.values(), key=lambda c: -c["us"])
    lines = [f"kiln decode step, batch {batch}: GPU time per step {total:.1f} us over {len(kernels)} kernels "
             f"(torch.profiler, {PROFILE_STEPS} replays; triton max rows {moe_triton_max_rows()})", "",
             f"{'category':<20} {'kernels':>7} {'calls/step':>10} {'us/step':>10} {'share':>7}"]
    lines += [f"{c['category']:<20} {c['kernels']:>7} {c['calls']:>10.0f} {c['us']:>10.1f} {c['share']:>7.1%}"
              for c in cats]
    lines += ["", f"{'kernel':<100} {'category':<20} {'calls/step':>10} {'us/step':>10} {'share':>7}"]
    lines += [f"{k['name'][:100]:<100} {k['category']:<20} {k['calls']:>10.0f} {k['us']:>10.1f} {k['us'] / total:>7.1%}"
              for k in kernels]
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(args.out, f"profile_kiln{args.tag_suffix}_b{batch}.txt"), "w") as f:
        f.write(text + "\n")
    return {"gpu_us_per_step": total, "categories": cats, "kernels": kernels[:60]}


def moe_triton_max_rows() -> int:
    from kiln.workers.layers.moe_triton import max_rows

    return max_rows()


def run_op_sweep(args, out: dict) -> None:
    """The experts of one MoE layer alone at Qwen3-30B-A3B's shapes, each variant over LAYERS
    distinct layers' weights in one CUDA graph (so L2 holds none of them), µs per layer:
    - routed_triton: kiln::moe_routed's Triton kernels (what a decode step runs: unsorted pairs,
      the weighted sum fused), at any row count (the row limit lifted for the sweep);
    - routed_grouped: kiln::moe_routed with the Triton path off: sort, gather, two grouped
      matmuls, weighted sum (eager here; Inductor fuses the small ops in kiln's CPU-traced form);
    - sorted_triton / grouped: kiln::moe_experts' Triton kernels and grouped matmuls alone on
      rows already sorted;
    and the Triton kernels' block sizes at 1 and 8 tokens."""
    from kiln.workers.layers import moe_triton
    from kiln.workers.layers.moe import group_by_expert, route
    from kiln.workers.layers.moe_experts import experts_grouped, moe_routed_impl

    cfg = QWEN3_30B_A3B
    e, h, top_k = cfg["num_experts"], cfg["hidden_size"], cfg["num_experts_per_tok"]
    inter = cfg["moe_intermediate_size"]
    layers = 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = [(torch.empty(e, 2 * inter, h, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02, generator=gen),
                torch.empty(e, h, inter, dtype=torch.bfloat16, device="cuda").normal_(0, 0.02, generator=gen))
               for _ in range(layers)]

    def inputs(tokens: int):
        logits = torch.randn(tokens, e, device="cuda", generator=gen)
        w, chosen = route(logits, top_k, softmax_first=True, renormalize=True)
        x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        order, offsets = group_by_expert(chosen, e)
        active = int(chosen.unique().numel())
        return x, w, chosen, x[order // top_k].contiguous(), offsets, active

    def time_graph(fn, limit: int | None = None) -> float:
        old = os.environ.get(moe_triton.MAX_ROWS_ENV)
        if limit is not None:
            os.environ[moe_triton.MAX_ROWS_ENV] = str(limit)
        try:
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            ms = median_ms(graph.replay, steps=args.steps, warmup=5)
            del graph
        finally:
            if old is None:
                os.environ.pop(moe_triton.MAX_ROWS_ENV, None)
            else:
                os.environ[moe_triton.MAX_ROWS_ENV] = old
        return ms * 1e3 / layers  # µs per layer

    def tb_s(active: int, us: float) -> float:
        return 2 * active * 3 * h * inter / us / 1e6

    rows_out = []
    for tokens in (1, 2, 4, 8, 16, 32, 64):
        x, w, chosen, rows, offsets, active = inputs(tokens)
        row = {"tokens": tokens, "rows": tokens * top_k, "active_experts": active}
        row["routed_triton_us"] = time_graph(lambda: [moe_routed_impl(x, w, chosen, gu, dn) for gu, dn in weights],
                                             limit=10**9)
        row["routed_grouped_us"] = time_graph(lambda: [moe_routed_impl(x, w, chosen, gu, dn) for gu, dn in weights],
                                              limit=0)
        row["sorted_triton_us"] = time_graph(
            lambda: [moe_triton.triton_moe_experts(rows, offsets, gu, dn) for gu, dn in weights])
        row["grouped_us"] = time_graph(lambda: [experts_grouped(rows, offsets, gu, dn) for gu, dn in weights])
        row["routed_triton_tb_s"] = tb_s(active, row["routed_triton_us"])
        row["grouped_tb_s"] = tb_s(active, row["grouped_us"])
        rows_out.append(row)
        print(row, flush=True)
        out["op_sweep"] = rows_out
        save(args, out)
    blocks = []
    for tokens in (1, 8):
        x, w, chosen, _, _, active = inputs(tokens)
        for config in ("16,256,16,128", "16,512,16,128", "8,256,8,128", "8,512,16,64", "32,256,32,128",
                       "16,256,32,64", "32,128,16,256"):
            os.environ[moe_triton.BLOCKS_ENV] = config
            try:
                us = time_graph(lambda: [moe_triton.triton_moe_routed(x, w, chosen, gu, dn) for gu, dn in weights])
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: report it
                us = None
                out.setdefault("errors", []).append(f"blocks {config}: {type(exc).__name__}: {exc}"[:300])
            finally:
                del os.environ[moe_triton.BLOCKS_ENV]
            blocks.append({"tokens": tokens, "blocks": config, "triton_us": us,
                           "tb_s": tb_s(active, us) if us else None})
            print(blocks[-1], flush=True)
            out["block_sweep"] = blocks
            save(args, out)


def run_floor(args, out: dict) -> None:
    """The weight matmuls of one decode step alone, in one CUDA graph: with the active experts
    (as many per layer as the routing measured) and without them (the dense part)."""
    cfg = QWEN3_30B_A3B
    h, d, layers = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    hq, hkv, v, e = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"], cfg["num_experts"]
    inter, top_k = cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    routing = out["routing"]
    active = {b: min(e, math.ceil(routing[b]["mean"])) for b in args.batches}
    most = max(active.values())

    def draw(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.bfloat16, device="cuda").normal_(0.0, 0.02)

    dense = [(draw((hq + 2 * hkv) * d, h), draw(h, hq * d), draw(e, h)) for _ in range(layers)]
    experts = [(draw(most, 2 * inter, h), draw(most, h, inter)) for _ in range(layers)]
    lm_head = draw(v, h)
    rows = []
    for b in args.batches:
        n = active[b]
        r = math.ceil(top_k * b / n)  # rows per active expert: the step's k·b pairs, spread evenly
        x_h, x_o = draw(b, h), draw(b, hq * d)
        x_e, x_i = draw(n, r, h), draw(n, r, inter)
        o_qkv, o_o, o_r = draw(b, (hq + 2 * hkv) * d), draw(b, h), draw(b, e)
        o_13, o_2, o_lm = draw(n, r, 2 * inter), draw(n, r, h), draw(b, v)

        def step(with_experts: bool) -> None:
            for (w_qkv, w_o, w_r), (w_13, w_2) in zip(dense, experts):
                torch.mm(x_h, w_qkv.t(), out=o_qkv)
                torch.mm(x_o, w_o.t(), out=o_o)
                torch.mm(x_h, w_r.t(), out=o_r)
                if with_experts:
                    torch.bmm(x_e, w_13[:n].transpose(1, 2), out=o_13)
                    torch.bmm(x_i, w_2[:n].transpose(1, 2), out=o_2)
            torch.mm(x_h, lm_head.t(), out=o_lm)

        row = {"batch": b, "active_experts": n}
        for label, with_experts in (("floor_ms", True), ("dense_floor_ms", False)):
            step(with_experts)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step(with_experts)
            row[label] = median_ms(graph.replay, steps=args.steps)
            del graph
        row["floor_tb_s"] = (dense_bytes(cfg) + expert_bytes(cfg, n)) / row["floor_ms"] / 1e9
        rows.append(row)
        print(row, flush=True)
    out["floor"] = rows
    save(args, out)
    del dense, experts, lm_head
    gc.collect()
    torch.cuda.empty_cache()


def run_warmup_cli(args, out: dict) -> None:
    """Cold, then warm `kiln warmup` of the model: the per-phase table of each."""
    ckpt = write_checkpoint_dir(args.work)
    root = os.path.join(args.work, "warmup-cache")
    results = {}
    for label in ("cold", "warm"):
        report = os.path.join(args.out, f"moe_warmup_{label}.json")
        cmd = [sys.executable, "-m", "kiln", "warmup", ckpt, "--tp", "1", "--cache-root", root,
               "--sizes", ",".join(map(str, CAPTURE_SIZES)), "--model-arg", "load_format=dummy",
               "--model-arg", "dtype=bfloat16", "--model-arg", f"max_seqs={max(CAPTURE_SIZES)}",
               "--model-arg", f"max_seq_len={args.context + 64}", "--report", report, "--quiet"]
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
        wall = time.perf_counter() - t0
        print(run.stdout[-3000:], run.stderr[-2000:] if run.returncode else "", flush=True)
        results[label] = {"returncode": run.returncode, "command_s": wall, "table": run.stdout[-3000:]}
    out["warmup_cli"] = results


# ---- transformers ---------------------------------------------------------------------------


def run_transformers(args, out: dict) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**{k: v for k, v in QWEN3_30B_A3B.items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):  # bf16 from the start: fp32 first would need 122 GB
        model = Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    torch.cuda.synchronize()
    out["hf_setup"] = {"build_s": time.perf_counter() - t0,
                       "experts_implementation": getattr(model.config, "_experts_implementation", None)}
    print(out["hf_setup"], flush=True)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    short, long = args.hf_tokens
    variants = {"static": ("hf_static_ms", {"cache_implementation": "static"}),
                "eager": ("hf_eager_ms", {"disable_compile": True})}  # eager first by default: no compile
    rows = {b: {"batch": b} for b in args.batches}
    out["transformers"] = list(rows.values())
    start = time.perf_counter()
    for name in args.hf_variants:
        label, kwargs = variants[name]
        for b in args.batches:
            spent = time.perf_counter() - start
            if args.hf_budget_s and spent > args.hf_budget_s:
                rows[b][label] = None
                out.setdefault("skipped", []).append(
                    f"{label} b={b}: not started, {spent:.0f} s of the part's {args.hf_budget_s:.0f} s budget spent "
                    "(static-cache generate compiles per batch size)")
                print(out["skipped"][-1], flush=True)
                continue
            prompt = torch.randint(0, 150000, (b, args.context), device="cuda")
            t0 = time.perf_counter()
            try:
                rows[b][label] = generate_step_ms(model, prompt, short, long, **kwargs)
            except Exception as exc:  # noqa: BLE001 - report what failed, keep the other rows
                rows[b][label] = None
                out.setdefault("errors", []).append(f"{label} b={b}: {type(exc).__name__}: {exc}"[:500])
                torch.cuda.empty_cache()
            rows[b][label.replace("_ms", "_wall_s")] = time.perf_counter() - t0
            print(label, rows[b], flush=True)
            save(args, out)


# ---- table ----------------------------------------------------------------------------------


def combine(directory: str) -> None:
    parts = {}
    for name in ("kiln", "kiln_grouped", "transformers", "transformers_static", "warmup", "op"):
        path = os.path.join(directory, f"moe_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts[name] = json.load(f)
    kiln, hf = parts.get("kiln", {}), parts.get("transformers", {})
    by_batch: dict[int, dict] = {}
    for rows in (kiln.get("kiln", []), kiln.get("floor", []), hf.get("transformers", []),
                 parts.get("transformers_static", {}).get("transformers", [])):
        for r in rows:
            row = by_batch.setdefault(r["batch"], {"batch": r["batch"]})
            row.update({k: v for k, v in r.items() if v is not None})
    for r in parts.get("kiln_grouped", {}).get("kiln", []):
        by_batch.setdefault(r["batch"], {"batch": r["batch"]})["kiln_grouped_ms"] = r["kiln_ms"]
    for b, routed in kiln.get("routing", {}).items():
        by_batch.setdefault(int(b), {"batch": int(b)})["experts_touched"] = routed["mean"]
    table = []
    for b, r in sorted(by_batch.items()):
        if r.get("kiln_ms") and r.get("experts_touched") is not None:
            r["kiln_tb_s"] = (dense_bytes(QWEN3_30B_A3B) + expert_bytes(QWEN3_30B_A3B, r["experts_touched"])) \
                / r["kiln_ms"] / 1e9
        if r.get("kiln_ms") and r.get("floor_ms"):
            r["kiln_vs_floor"] = r["kiln_ms"] / r["floor_ms"]
        best_hf = min((r[k] for k in ("hf_static_ms", "hf_eager_ms") if r.get(k)), default=None)
        if r.get("kiln_ms") and best_hf:
            r["kiln_vs_best_hf"] = r["kiln_ms"] / best_hf
        table.append(r)
    print(kiln.get("machine") or hf.get("machine"))
    if table:
        print_table(table, ["batch", "experts_touched", "kiln_ms", "kiln_grouped_ms", "hf_static_ms", "hf_eager_ms",
                            "floor_ms", "dense_floor_ms", "floor_tb_s", "kiln_tb_s", "kiln_vs_floor",
                            "kiln_vs_best_hf"])
    if parts.get("op", {}).get("op_sweep"):
        print("one layer's experts alone (us per layer):")
        print_table(parts["op"]["op_sweep"], ["tokens", "rows", "active_experts", "routed_triton_us",
                                              "routed_grouped_us", "sorted_triton_us", "grouped_us",
                                              "routed_triton_tb_s", "grouped_tb_s"])
        if parts["op"].get("block_sweep"):
            print_table(parts["op"]["block_sweep"], ["tokens", "blocks", "triton_us", "tb_s"])
    for part in parts.values():
        for error in part.get("errors", []):
            print("error:", error)
        for skipped in part.get("skipped", []):
            print("skipped:", skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["kiln", "transformers", "warmup", "op"])
    parser.add_argument("--combine", metavar="DIR")
    parser.add_argument("--out", default=".")
    parser.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=BATCHES)
    parser.add_argument("--context", type=int, default=128, help="tokens of context per sequence at decode")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--hf-tokens", type=int, nargs=2, default=(8, 40), metavar=("SHORT", "LONG"))
    parser.add_argument("--hf-variants", type=lambda s: s.split(","), default=["eager", "static"],
                        help="comma-separated subset of eager,static (run in that order)")
    parser.add_argument("--hf-budget-s", type=float, default=0.0,
                        help="transformers: start no new measurement after this many seconds (0: no limit)")
    parser.add_argument("--triton-max-rows", type=int, default=None,
                        help="kiln's MoE Triton row limit for this run ($KILN_MOE_TRITON_MAX_ROWS; 0: off)")
    parser.add_argument("--tag", default="", help="write moe_PART_TAG.json (e.g. kiln grouped, transformers static)")
    parser.add_argument("--cache-dir", default=None, help="kiln's compile cache (default: a fresh temp dir)")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile kiln's batch-1 and -8 steps (kernel tables)")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
        return
    if args.part is None:
        parser.error("--part or --combine is required")
    if not torch.cuda.is_available():
        sys.exit("moe_decode.py needs a CUDA GPU")
    if max(args.batches) > max(CAPTURE_SIZES):
        parser.error(f"--batches: at most {max(CAPTURE_SIZES)} (the largest capture size)")
    os.makedirs(args.out, exist_ok=True)
    args.work = tempfile.mkdtemp(prefix="kiln-moe-bench-")
    if args.triton_max_rows is not None:
        from kiln.workers.layers.moe_triton import MAX_ROWS_ENV

        os.environ[MAX_ROWS_ENV] = str(args.triton_max_rows)
    args.tag_suffix = f"_{args.tag}" if args.tag else ""
    args.json_name = f"moe_{args.part}{args.tag_suffix}.json"
    out: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "context": args.context,
                 "dense_gb": dense_bytes(QWEN3_30B_A3B) / 1e9,
                 "all_experts_gb": expert_bytes(QWEN3_30B_A3B, QWEN3_30B_A3B["num_experts"]) / 1e9}
    if args.part in ("kiln", "op"):
        out["triton_max_rows"] = moe_triton_max_rows()
    if args.part == "kiln":
        run_kiln(args, out)
        if not args.no_floor:
            run_floor(args, out)
    elif args.part == "transformers":
        run_transformers(args, out)
    elif args.part == "op":
        run_op_sweep(args, out)
    else:
        run_warmup_cli(args, out)
    save(args, out)
    combine(args.out)


if __name__ == "__main__":
    main()
