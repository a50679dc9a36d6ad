"""Orchestrator.generate and `kiln generate` on the example model, TP=1 and TP=2 (gloo).

The reference is the eager model decoding greedily the slowest way: each prompt alone, the
whole sequence recomputed at every step (no KV cache carried over), so batching, positions,
slots and the cache of kiln's path are all checked against something that has none of them.
The pieces run as traced (use_inductor=False): what is tested here is generation, not Inductor.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from click.testing import CliRunner

from kiln import CompilationConfig, Orchestrator
from kiln.orchestrator.cli import main
from kiln.workers.runtime.generation import GenerateResult, check_request, limits_of
from tests.orchestrator.conftest import TINY

MODEL = "examples/toy_llama.py:build"
PROMPTS = [[5, 9, 3], [7], [1, 2, 3, 4, 5, 6]]
NEW_TOKENS = 6


def reference(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from examples.toy_llama import build

    model = build(**TINY)
    out = []
    with torch.no_grad():
        for prompt in prompts:
            seq = list(prompt)
            for _ in range(new_tokens):
                model.reset_cache()
                n = len(seq)
                logits = model(torch.tensor(seq), torch.arange(n), torch.zeros(n, dtype=torch.long))
                seq.append(int(logits[-1].argmax()))
            out.append(seq[len(prompt):])
    return out


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return reference(PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("generate") / "root"


@pytest.fixture(scope="module")
def orchestrators(ray_cluster, root):
    """Warmed-up orchestrators at TP=1 and TP=2 (3 of the cluster's 4 CPUs; the CLI's takes the 4th)."""
    with contextlib.ExitStack() as stack:
        found = {}
        for tp in (1, 2):
            found[tp] = stack.enter_context(Orchestrator(
                MODEL, tp, CompilationConfig(use_inductor=False), str(root), model_kwargs=TINY, progress=False))
            found[tp].warmup([1, 2, 4])
        yield found


@pytest.fixture()
def orch(orchestrators):
    return orchestrators[1]


@pytest.mark.parametrize("tp", [1, 2])
def test_generate_equals_the_eager_greedy_reference(orchestrators, tp, expected):
    orch = orchestrators[tp]
    result = orch.generate(PROMPTS, NEW_TOKENS)
    assert isinstance(result, GenerateResult)
    assert result.tokens == expected
    assert result.new_tokens == len(PROMPTS) * NEW_TOKENS
    assert result.tokens_per_second > 0 and result.prefill_seconds > 0 and result.decode_seconds > 0
    # Again, with other prompts in between: the cache is reset, nothing carries over.
    assert orch.generate([[11, 12]], 3).tokens == reference([[11, 12]], 3)
    assert orch.generate(PROMPTS[::-1], NEW_TOKENS).tokens == expected[::-1]


BAD_REQUESTS = [
    ([[1]] * 5, 2, "5 prompts, but the model's KV cache holds 4 sequences"),
    ([[1] * 12], 5, r"prompt 0: 12 tokens \+ 5 new tokens exceed the model's max_seq_len 16"),
    ([[1], []], 2, "prompt 1 is empty"),
    ([[1, 64]], 2, r"prompt 0: token id 64 is out of the vocabulary \(0..63\)"),
    ([[1, -1]], 2, "token id -1 is not a non-negative integer"),
    ([[1, True]], 2, "token id True is not a non-negative integer"),
    ([[1, 2]], 0, "max_new_tokens must be a positive integer"),
    ([], 2, "prompts must be a non-empty list"),
    (["hello"], 2, "prompt 0: expected a list of token ids, got str"),
]


@pytest.mark.parametrize(("prompts", "new_tokens", "message"), BAD_REQUESTS)
def test_bad_requests_are_refused_before_any_rank_runs(orch, prompts, new_tokens, message):
    with pytest.raises(ValueError, match=message):
        orch.generate(prompts, new_tokens)
    assert orch.started  # the workers are still there


def test_workers_survive_refused_requests(orch, expected):
    with pytest.raises(ValueError):
        orch.generate([[1]] * 5, 2)
    assert orch.generate(PROMPTS[:1], NEW_TOKENS).tokens == expected[:1]


def test_generate_before_warmup_is_refused():
    with pytest.raises(RuntimeError, match="generate\\(\\) needs a warm-up first"):
        Orchestrator(MODEL).generate([[1]], 1)


def test_a_model_without_limits_is_named():
    class NoLimits:
        max_seqs = 4
        max_seq_len = 0

    with pytest.raises(ValueError, match="NoLimits.*no positive integer attribute 'max_seq_len'"):
        limits_of(NoLimits())
    check_request([[1, 2]], 3)  # without limits: only what needs no model


# ---- the CLI -------------------------------------------------------------------------------------


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click 8.1
    except TypeError:
        return CliRunner()


def _cli_args(root, *extra: str) -> list[str]:
    args = ["generate", MODEL, "--max-new-tokens", str(NEW_TOKENS), "--set", "use_inductor=false",
            "--cache-root", str(root), "--sizes", "1,2,4", "--quiet"]
    for key, value in TINY.items():
        args += ["--model-arg", f"{key}={json.dumps(value)}"]
    return args + list(extra)


def _tiny_tokenizer(path):
    """A word-level tokenizer over the example model's 64 ids: "<s>" (BOS, added to every text),
    "[UNK]", and the words w2..w63."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = {"[UNK]": 0, "<s>": 1, **{f"w{i}": i for i in range(2, TINY["vocab"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


def test_cli_prints_token_ids(ray_cluster, root, expected):
    result = _runner().invoke(main, _cli_args(root, *[f"--prompt-ids={','.join(map(str, p))}" for p in PROMPTS]))
    assert result.exit_code == 0, (result.output, result.exception)
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert lines == [f"[{i}] " + " ".join(map(str, tokens)) for i, tokens in enumerate(expected)]


def test_cli_prints_text_with_a_tokenizer(ray_cluster, root, tmp_path):
    from kiln.orchestrator.text import load_codec

    path = _tiny_tokenizer(tmp_path / "tokenizer.json")
    codec = load_codec(str(path))
    text = "w5 w9 w3"
    assert codec.encode(text) == [1, 5, 9, 3]  # BOS added
    want = codec.decode(reference([codec.encode(text)], NEW_TOKENS)[0])
    result = _runner().invoke(main, _cli_args(root, "--tokenizer", str(path), "--prompt", text))
    assert result.exit_code == 0, (result.output, result.exception)
    assert [line for line in result.stdout.splitlines() if line.startswith("[")] == [f"[0] {want}"]


def test_text_ids_round_trip_and_the_checkpoint_tokenizer_is_found(tmp_path):
    from kiln.orchestrator.text import load_codec, tokenizer_path

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert tokenizer_path(str(ckpt)) is None
    _tiny_tokenizer(ckpt / "tokenizer.json")
    assert tokenizer_path(str(ckpt)) == str(ckpt / "tokenizer.json")
    assert tokenizer_path(MODEL) is None  # a model spec has no directory
    codec = load_codec(tokenizer_path(str(ckpt)))
    assert codec.encode("w7 w2 nonsense") == [1, 7, 2, 0]
    assert codec.decode([1, 7, 2, 63]) == "w7 w2 w63"  # the BOS is dropped


def test_cli_text_without_a_tokenizer_is_a_clear_error(tmp_path):
    result = _runner().invoke(main, ["generate", MODEL, "--prompt", "hello"])
    assert result.exit_code == 2 and "has no tokenizer.json" in result.stderr
    result = _runner().invoke(main, ["generate", MODEL, "--prompt", "hi", "--tokenizer", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "no such file" in result.stderr
    result = _runner().invoke(main, ["generate", MODEL])
    assert result.exit_code == 2 and "at least one prompt" in result.stderr
    result = _runner().invoke(main, ["generate", MODEL, "--prompt-ids", "1,x"])
    assert result.exit_code == 2 and "comma-separated token ids" in result.stderr


def test_cli_text_without_the_library_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    path = _tiny_tokenizer(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now fails
    result = _runner().invoke(main, ["generate", MODEL, "--tokenizer", str(path), "--prompt", "w5"])
    assert result.exit_code == 2 and "needs the `tokenizers` library" in result.stderr
    assert "pip install 'torch-kiln[tokenizers]'" in result.stderr
