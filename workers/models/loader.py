"""Build a zoo model from a checkpoint directory (`config.json` + `*.safetensors`), on this rank.

`config.json` picks the architecture (`architectures[0]`); the model is built for this rank's
tensor-parallel slice with empty parameters straight on the rank's device; then either the
rank reads only its slices of the checkpoint (`load_format="auto"`), or it draws random weights
on its device (`load_format="dummy"`: config.json alone is enough, for warm-ups and benchmarks;
compiled artifacts do not depend on weight values). Mixture-of-experts checkpoints may store
experts one tensor per expert (published checkpoints, transformers' save_pretrained) or fused
(transformers 5's in-memory `experts.gate_up_proj`); the tensor names say which. Every check
(config, files, tensor names, shapes, dtypes) runs before anything is compiled: the worker builds
the model first.

Model args (`--model-arg NAME=VALUE`, `Orchestrator(model_kwargs=...)`):
- `load_format`: "auto" (read the checkpoint) or "dummy" (random weights).
- `dtype`: "auto" (default: the checkpoint tensors' dtype; with dummy weights the config's
  `torch_dtype`/`dtype`; float32 when neither says) or "bfloat16", "float16", "float32".
- `max_seqs`: KV-cache slots, i.e. sequences in flight (default 8); one more slot takes padding.
- `max_seq_len`: positions per slot (default min(2048, max_position_embeddings, sliding_window)).
- `device`: default "cuda" when CUDA is available (the rank's own GPU), else "cpu".
- `seed`: seed of the dummy weights (default 0).
"""

from __future__ import annotations

import torch

from kiln.workers.layers.shards import Placed, iter_placed
from kiln.workers.models.checkpoint import Checkpoint
from kiln.workers.models.decoder import CausalLM, RuntimeArgs
from kiln.workers.models.hf_config import ConfigError, HFConfig, read_hf_config

LOAD_FORMATS = ("auto", "dummy")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_SEQS = 8
DEFAULT_MAX_SEQ_LEN = 2048
DUMMY_STD = 0.02
"""Standard deviation of dummy weights (Hugging Face's usual initializer_range); norms are 1."""


def build(checkpoint: str, *, load_format: str = "auto", dtype: str | torch.dtype | None = "auto",
          max_seqs: int = DEFAULT_MAX_SEQS, max_seq_len: int | None = None, device: str | None = None,
          seed: int = 0) -> CausalLM:
    """This rank's model for the checkpoint directory `checkpoint` (see the module docstring)."""
    cfg = read_hf_config(checkpoint)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    if not isinstance(max_seqs, int) or isinstance(max_seqs, bool) or max_seqs < 1:
        raise ValueError(f"max_seqs must be a positive integer, got {max_seqs!r}")
    # Headers of every file are read (and checked) before any memory is allocated.
    ckpt = Checkpoint(checkpoint) if load_format == "auto" else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    args = RuntimeArgs(dtype=_dtype(dtype, cfg, ckpt), device=dev, max_seqs=max_seqs,
                       max_seq_len=_max_seq_len(max_seq_len, cfg), vocab=cfg.vocab_size,
                       expert_layout=expert_layout(ckpt))
    with torch.no_grad():
        model = CausalLM(cfg, args).eval()
        plan = list(iter_placed(model))
        _assert_plan_fills(model, plan)
        if ckpt is not None:
            ckpt.check(plan, allowed_extra=("lm_head.weight",) if cfg.tie_word_embeddings else ())
            model.loaded_bytes, model.load_seconds = ckpt.load(plan, dev)
        else:
            dummy_init(plan, seed, dev)
    return model


FUSED_EXPERTS_SUFFIX = ".experts.gate_up_proj"


def expert_layout(ckpt: Checkpoint | None) -> str:
    """ "fused" when the checkpoint holds transformers 5's fused expert tensors, else "per_expert";
    dummy weights use the fused layout (three slices per layer to draw, not three per expert)."""
    if ckpt is None:
        return "fused"
    return "fused" if any(name.endswith(FUSED_EXPERTS_SUFFIX) for name in ckpt.tensors) else "per_expert"


def _dtype(requested: str | torch.dtype | None, cfg: HFConfig, ckpt: Checkpoint | None) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in (None, "auto"):
        if requested not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
    found = ckpt.first_dtype() if ckpt is not None else None
    if found is not None:
        return found
    if cfg.torch_dtype in DTYPES:
        return DTYPES[cfg.torch_dtype]
    return torch.float32


def _max_seq_len(requested: int | None, cfg: HFConfig) -> int:
    limits = {"max_position_embeddings": cfg.max_position_embeddings}
    if cfg.sliding_window is not None:
        # kiln's attention has no window: sequences up to the window are exact, longer ones are not
        limits["sliding_window"] = cfg.sliding_window
    if requested is None:
        return min(DEFAULT_MAX_SEQ_LEN, *limits.values())
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {requested!r}")
    for key, limit in limits.items():
        if requested > limit:
            raise ConfigError(f"max_seq_len {requested} exceeds {key} {limit} of {cfg.path}"
                              + (" (kiln's attention has no sliding window)" if key == "sliding_window" else ""))
    return requested


def _assert_plan_fills(model: CausalLM, plan: list[Placed]) -> None:
    """Every parameter is filled by some slice (an empty one would be used uninitialized)."""
    planned = {id(param) for param, _ in plan}
    unplanned = [name for name, p in model.named_parameters() if id(p) not in planned]
    assert not unplanned, f"parameters without a checkpoint slice: {unplanned}"


def dummy_init(plan: list[Placed], seed: int, device: torch.device) -> None:
    """Random weights drawn on `device` (norm weights 1): what load_format="dummy" builds."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for param, piece in plan:
        values = piece.destination(param)
        if piece.source.endswith("norm.weight"):
            values.fill_(1.0)
        else:
            values.normal_(0.0, DUMMY_STD, generator=gen)
