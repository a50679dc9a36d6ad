"""Greedy generation with zoo checkpoints equals transformers' greedy `generate` (float32), through
the driver at TP=2, and `kiln generate CKPT --prompt TEXT` prints text with the checkpoint's
tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.cli import main
from tests.models.conftest import MODEL_ARGS

NEW_TOKENS = 6
PROMPTS = [[5, 17, 3, 9], [42, 1], [7, 7, 7, 8, 30]]
# Trace once and split as always; pieces run as traced code (no Inductor), which keeps the test
# about decoding rather than compiling (compiled zoo models are tested in test_zoo_tp2.py).
CONFIG = {"use_inductor": False}


def transformers_greedy(hf: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    hf.generation_config.eos_token_id = None  # kiln generates a fixed number of tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama2", "qwen3"])
def test_generate_equals_transformers_greedy_at_tp2(name, checkpoints, ray_cluster, tmp_path):
    tiny = checkpoints(name)
    want = [transformers_greedy(tiny.hf, p, NEW_TOKENS) for p in PROMPTS]
    assert any(len(set(w)) > 1 for w in want)  # a real continuation, not one token repeated
    with Orchestrator(str(tiny.path), 2, CompilationConfig(**CONFIG), str(tmp_path / "cache"),
                      model_kwargs=MODEL_ARGS, device="cpu", progress=False) as orch:
        orch.warmup([1, 2, 4])
        result = orch.generate(PROMPTS, NEW_TOKENS)
    assert result.tokens == want
    assert result.tokens_per_second > 0


def _word_tokenizer(path, vocab: int):
    """A word-level tokenizer: "w<i>" is token i (i >= 1), anything else [UNK] (0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_cli_generate_prints_text_with_the_checkpoints_tokenizer(checkpoints, ray_cluster, tmp_path):
    import shutil

    tiny = checkpoints("llama3")
    ckpt = tmp_path / "llama3"
    shutil.copytree(tiny.path, ckpt)
    _word_tokenizer(ckpt / "tokenizer.json", tiny.vocab)
    prompt = [5, 17, 3, 9]
    want = transformers_greedy(tiny.hf, prompt, NEW_TOKENS)
    args = ["generate", str(ckpt), "--prompt", " ".join(f"w{i}" for i in prompt), "--max-new-tokens",
            str(NEW_TOKENS), "--tp", "2", "--device", "cpu", "--num-cpus", "4", "--sizes", "1,2",
            "--set", "use_inductor=false", "--cache-root", str(tmp_path / "cache"), "--quiet"]
    for key, value in MODEL_ARGS.items():
        args += ["--model-arg", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    # The new tokens, decoded: "w<i>" words (id 0 would print as [UNK]).
    words = [("[UNK]" if i == 0 else f"w{i}") for i in want]
    assert " ".join(words) in result.stdout
