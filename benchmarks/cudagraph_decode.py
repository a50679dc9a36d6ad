"""Decode latency with CUDA graphs: kiln's modes beside eager and torch.compile, one run.

    python benchmarks/cudagraph_decode.py [--layers 8 --hidden 1024] [--out results.json]

For each variant: correctness against eager (max |Δ logits|), compile and capture seconds,
capture memory, and the median latency (CUDA events) of a decode step at several batch sizes
and of one prefill. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine, median_ms, print_table, save_json  # noqa: E402
from examples.toy_llama import build  # noqa: E402

CAPTURE_SIZES = [1, 2, 4] + list(range(8, 257, 8))  # 35 sizes


def model_kwargs(args) -> dict:
    return dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                intermediate=args.intermediate, vocab=args.vocab, max_seq_len=args.max_seq_len,
                max_seqs=max(args.batches) + 1, dtype="bfloat16", device="cuda", seed=0)


def decode_inputs(b: int, pos: int):
    return (torch.arange(b, device="cuda") % 1000, torch.full((b,), pos, device="cuda"),
            torch.arange(b, device="cuda"))


def prefill_inputs(seqs: int, tokens: int):
    n = seqs * tokens
    return (torch.arange(n, device="cuda") % 1000, torch.arange(tokens, device="cuda").repeat(seqs),
            torch.arange(seqs, device="cuda").repeat_interleave(tokens))


def make_variant(name: str, args, cache_root: str):
    """(model, callable(inputs, decode), compile_s, capture_s, capture_gib)."""
    from kiln.workers.config import CompilationConfig
    from kiln.workers.layers.custom_op import building_with
    from kiln.workers.runtime.kiln_model import KilnModel

    if name.startswith("kiln"):
        from kiln.cache import CacheStore

        mode = name.split(" ", 1)[1]
        config = CompilationConfig(cudagraph_mode=mode, cudagraph_copy_inputs=True)
        with building_with(config):
            model = build(**model_kwargs(args))
        kiln = KilnModel(model, config, store=CacheStore(cache_root))
        t0 = time.perf_counter()
        record = kiln.compile(CAPTURE_SIZES)
        total = time.perf_counter() - t0
        cap = next((p for p in record.phases if p.name == "capture"), None)
        capture_s = cap.seconds if cap else 0.0
        gib = cap.extra["gib"] if cap else 0.0
        fn = lambda inputs, decode: kiln(*inputs, decode=decode)  # noqa: E731
        return model, fn, total - capture_s, capture_s, gib, record
    model = build(**model_kwargs(args))
    if name == "eager":
        return model, lambda inputs, decode: model(*inputs), 0.0, 0.0, 0.0, None
    mode = {"torch.compile": None, "reduce-overhead": "reduce-overhead"}[name]
    compiled = torch.compile(model, mode=mode) if mode else torch.compile(model)
    # Warm every shape the benchmark uses, so compile (and cudagraph-tree recording) is counted here.
    t0 = time.perf_counter()
    free0 = torch.cuda.mem_get_info()[0]
    with torch.no_grad():
        for b in args.batches:
            for _ in range(3):
                compiled(*decode_inputs(b, 10))
        for _ in range(3):
            compiled(*prefill_inputs(args.prefill_seqs, args.prefill_tokens))
    torch.cuda.synchronize()
    gib = (free0 - torch.cuda.mem_get_info()[0]) / 2**30 if mode else 0.0
    return model, lambda inputs, decode: compiled(*inputs), time.perf_counter() - t0, 0.0, gib, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=[
        "eager", "torch.compile", "reduce-overhead", "kiln NONE", "kiln PIECEWISE", "kiln FULL",
        "kiln FULL_AND_PIECEWISE"])
    p.add_argument("--cache-root", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    cache_root = args.cache_root or tempfile.mkdtemp(prefix="kiln-bench-")
    print(f"machine: {machine()}\nmodel: {model_kwargs(args)}\ncapture sizes: {len(CAPTURE_SIZES)}", flush=True)

    reference = build(**model_kwargs(args))
    check = [decode_inputs(16, 10), prefill_inputs(args.prefill_seqs, args.prefill_tokens)]
    with torch.no_grad():
        expected = []
        for inputs in check:
            reference.reset_cache()
            expected.append(reference(*inputs).float())
    del reference

    rows = []
    for name in args.variants:
        gc.collect()
        torch.cuda.empty_cache()
        model, fn, compile_s, capture_s, gib, record = make_variant(name, args, cache_root)
        row = {"variant": name, "compile_s": compile_s, "capture_s": capture_s, "capture_gib": gib}
        if record is not None:
            row["inductor_compiles"] = record.inductor_compiles
            row["cache_hits"] = record.cache_hits
        with torch.no_grad():
            errs = []
            for inputs, want, decode in zip(check, expected, (True, False)):
                model.reset_cache()
                errs.append((fn(inputs, decode).float() - want).abs().max().item())
            row["max_err"] = max(errs)
            for b in args.batches:
                inputs = decode_inputs(b, 10)
                row[f"decode b={b} ms"] = median_ms(lambda: fn(inputs, True))
            prefill = prefill_inputs(args.prefill_seqs, args.prefill_tokens)
            row[f"prefill {args.prefill_seqs}x{args.prefill_tokens} ms"] = median_ms(lambda: fn(prefill, False), steps=30)
        rows.append(row)
        print(row, flush=True)
        del model, fn
    columns = ["variant", "max_err", *[f"decode b={b} ms" for b in args.batches],
               f"prefill {args.prefill_seqs}x{args.prefill_tokens} ms", "compile_s", "capture_s", "capture_gib",
               "inductor_compiles", "cache_hits"]
    print()
    table = print_table(rows, columns)
    save_json(args.out, {"machine": machine(), "model": model_kwargs(args), "rows": rows, "table": table,
                         "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
