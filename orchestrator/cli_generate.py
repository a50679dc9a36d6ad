"""`kiln generate MODEL --prompt TEXT | --prompt-ids 1,2,3 --max-new-tokens N --tp N …`

Warms up MODEL on every rank (compiling or loading from the cache, as `kiln warmup` does), then
decodes greedily (`Orchestrator.generate`) and prints, per prompt, the new text when there is a
tokenizer (MODEL's tokenizer.json, or --tokenizer FILE; read with the `tokenizers` library, an
optional extra) and the new token ids otherwise. Outputs go to stdout, one line per prompt in
the order given (--prompt ones first); timings go to stderr.
"""

from __future__ import annotations

import sys

import click

from kiln.orchestrator.cli_config import InvalidConfig, _resolve
from kiln.orchestrator.cli_warmup import run_options
from kiln.orchestrator.text import INSTALL_HINT, TokenizerError, load_codec, tokenizer_path, tokenizers_available


def _parse_prompt_ids(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> list[list[int]]:
    prompts = []
    for item in value:
        try:
            ids = [int(part) for part in item.split(",") if part.strip()]
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected comma-separated token ids, e.g. 1,2,3") from None
        if not ids or any(i < 0 for i in ids):
            raise click.BadParameter(f"{item!r}: expected comma-separated non-negative token ids, e.g. 1,2,3")
        prompts.append(ids)
    return prompts


def _codec(model: str, explicit: str | None, texts: tuple[str, ...]):
    """The tokenizer to use, or None (token ids in and out); errors when text needs one."""
    try:
        path = tokenizer_path(model, explicit)
    except TokenizerError as exc:
        raise click.BadParameter(str(exc), param_hint="--tokenizer") from None
    if path is None:
        if texts:
            raise click.BadParameter(f"text needs a tokenizer, but {model!r} has no tokenizer.json: give "
                                     "--tokenizer FILE, or token ids with --prompt-ids", param_hint="--prompt")
        return None
    if not tokenizers_available() and not texts:
        click.echo(f"kiln generate: {path} is there but the `tokenizers` library is not ({INSTALL_HINT}): "
                   "printing token ids", err=True)
        return None
    try:
        return load_codec(path)
    except TokenizerError as exc:
        raise click.BadParameter(str(exc), param_hint="--prompt" if texts else "--tokenizer") from None


@click.command("generate")
@click.argument("model")
@click.option("--prompt", "texts", multiple=True, metavar="TEXT", help="A text prompt (repeatable; needs a tokenizer).")
@click.option("--prompt-ids", "id_prompts", multiple=True, callback=_parse_prompt_ids, metavar="1,2,3",
              help="A prompt as comma-separated token ids (repeatable).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens to generate per prompt (greedy).")
@click.option("--tokenizer", "tokenizer_file", type=click.Path(dir_okay=False),
              help="tokenizer.json to use (default: MODEL/tokenizer.json when MODEL is a directory).")
@run_options
@click.option("--quiet", is_flag=True, help="No live progress, no timings.")
def generate_command(model, texts, id_prompts, max_new_tokens, tokenizer_file, tp_size, sizes, config_file,
                     overrides, model_kwargs, cache_root, address, device, num_cpus, quiet) -> None:
    """Greedy generation with MODEL (a checkpoint directory, 'pkg.module:factory' or 'path/file.py:factory')."""
    if not texts and not id_prompts:
        raise click.UsageError("give at least one prompt: --prompt TEXT or --prompt-ids 1,2,3")
    codec = _codec(model, tokenizer_file, texts)
    prompts = [codec.encode(text) for text in texts] if codec is not None else []
    prompts += id_prompts
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise click.BadParameter(f"prompt {i} ({texts[i]!r}) encodes to no tokens", param_hint="--prompt")
    config = _resolve(config_file, overrides)

    from kiln.orchestrator.driver import Orchestrator, WarmupError
    from kiln.workers.models.spec import ModelSpecError

    try:
        orch = Orchestrator(model, tp_size, config, cache_root, address, model_kwargs=model_kwargs,
                            device=device, num_cpus=num_cpus, progress=not quiet)
    except ModelSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="MODEL") from None
    except ValueError as exc:
        raise InvalidConfig(str(exc)) from None
    try:
        with orch:
            report = orch.warmup(sizes)
            result = orch.generate(prompts, max_new_tokens)
    except WarmupError as exc:
        for failure in exc.failures:
            click.echo(f"kiln generate failed: rank {failure['rank']}, phase {failure['phase']!r}: "
                       f"{failure['cause']}", err=True)
        sys.exit(1)
    except (RuntimeError, ValueError, OSError) as exc:
        click.echo(f"kiln generate failed: {exc}", err=True)
        sys.exit(1)
    for i, tokens in enumerate(result.tokens):
        click.echo(f"[{i}] " + (codec.decode(tokens) if codec is not None else " ".join(map(str, tokens))))
    if not quiet:
        totals = report.totals()
        click.echo(f"warm-up {report.wall_seconds:.1f} s ({totals['inductor_compiles']} compiles, "
                   f"{totals['cache_hits']} cache hits); generated {result.new_tokens} tokens in "
                   f"{result.seconds:.3f} s: {result.tokens_per_second:.1f} tokens/s (prefill "
                   f"{result.prefill_seconds:.3f} s, decode {result.decode_seconds:.3f} s)", err=True)
