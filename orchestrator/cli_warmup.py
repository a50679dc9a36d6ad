"""`kiln warmup MODEL --tp N --sizes 1,2,4 …`: fill the cache for a model and layout.

Runs on an embedded local Ray cluster (127.0.0.1) unless --address names one, prints the
per-rank table, optionally writes the JSON report and the Perfetto trace (checked up front, and
written on failure too, listing what failed), and exits non-zero naming rank, phase and cause
when a rank fails.
"""

from __future__ import annotations

import json
import sys

import click

from kiln.orchestrator.cli_config import InvalidConfig, _resolve
from kiln.orchestrator.report import ReportError, RunReport, check_writable


def _parse_sizes(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated positive integers, e.g. 1,2,4,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"{value!r}: expected comma-separated positive integers, e.g. 1,2,4,8")
    return sizes


def _parse_kwargs(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> dict:
    out = {}
    for item in value:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE, e.g. layers=4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _check_outputs(report_path: str | None, trace_path: str | None) -> None:
    """Refuse unwritable --report/--trace paths before the warm-up, not after it."""
    for option, path in (("--report", report_path), ("--trace", trace_path)):
        if path:
            try:
                check_writable(path)
            except ReportError as exc:
                raise click.BadParameter(str(exc), param_hint=option) from None


def _write_outputs(report: RunReport, report_path: str | None, trace_path: str | None) -> None:
    """Write --report and --trace; a write that fails anyway (disk full, a race) names the option."""
    outputs = (("--report", report_path, report.to_json, "report: {}"),
               ("--trace", trace_path, report.write_chrome_trace, "trace:  {} (open in https://ui.perfetto.dev)"))
    for option, path, write, line in outputs:
        if path:
            try:
                written = write(path)
            except ReportError as exc:
                raise click.ClickException(f"{option}: {exc}") from None
            click.echo(line.format(written))


def run_options(command):
    """The options every command that runs MODEL on a cluster takes (`warmup`, `generate`)."""
    for option in reversed(_RUN_OPTIONS):
        command = option(command)
    return command


_RUN_OPTIONS = [
    click.option("--tp", "tp_size", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Tensor-parallel size: one worker (GPU or CPU bundle) per rank."),
    click.option("--sizes", callback=_parse_sizes, help="Batch sizes to compile and capture, e.g. 1,2,4,8."),
    click.option("--config", "config_file", type=click.Path(dir_okay=False), help="CompilationConfig JSON file."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (repeatable)."),
    click.option("--model-arg", "model_kwargs", multiple=True, callback=_parse_kwargs, metavar="NAME=VALUE",
                 help="Keyword argument for the model factory (repeatable), e.g. layers=4."),
    click.option("--cache-root", type=click.Path(file_okay=False), help="Cache root ($KILN_CACHE_ROOT or ~/.cache/kiln)."),
    click.option("--address", default=None, help="Ray cluster to attach to ('auto' or host:port); default: embedded."),
    click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True),
    click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of an embedded cluster."),
]


@click.command("warmup")
@click.argument("model")
@run_options
@click.option("--load-format", type=click.Choice(["auto", "dummy"]), default=None,
              help="Checkpoint directories: read the weights (auto) or draw random ones from config.json alone "
                   "(dummy; compiled artifacts do not depend on weight values). Same as --model-arg load_format=….")
@click.option("--placement", type=click.Choice(["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]),
              default="PACK", show_default=True)
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Retry a failed warm-up this many times, reusing what the cache holds.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the JSON run report here.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), help="Write a Perfetto/Chrome trace here.")
@click.option("--quiet", is_flag=True, help="No live progress.")
@click.option("--cudagraph-capture", type=click.Choice(["eager", "lazy"]), default=None,
              help="When ranks capture CUDA graphs (config field cudagraph_capture; default: the config's, eager): "
                   "lazy reports a rank ready once its pieces are loaded and captures in the background, "
                   "smallest size first (order: --set cudagraph_capture_order=[8,1]). The warm-up does not wait "
                   "for background captures; the report says how many were done.")
@click.option("--fanout", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Cluster fan-out: a rank that misses asks the cluster's registry before compiling "
                   "(auto: when the ranks span nodes or a registry already runs).")
@click.option("--fanout-lifetime", type=click.Choice(["job", "cluster"]), default="job", show_default=True,
              help="cluster: a registry started here outlives this job, for serving nodes that join later.")
def warmup_command(model, tp_size, sizes, config_file, overrides, model_kwargs, load_format, cache_root, address,
                   placement, device, num_cpus, retries, report_path, trace_path, quiet, cudagraph_capture,
                   fanout, fanout_lifetime) -> None:
    """Compile MODEL ('pkg.module:factory', 'path/file.py:factory' or a checkpoint directory) on
    every rank into the cache."""
    from kiln.workers.models.spec import ModelSpecError, parse_model_spec

    _check_outputs(report_path, trace_path)

    try:
        _, factory = parse_model_spec(model)
    except ModelSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="MODEL") from None
    if cudagraph_capture is not None:  # the flag is a --set, applied after the others
        overrides = (*overrides, f"cudagraph_capture={cudagraph_capture}")
    config = _resolve(config_file, overrides)
    if load_format is not None:
        if factory:  # "" for a checkpoint directory
            raise click.BadParameter("only for a checkpoint directory MODEL", param_hint="--load-format")
        model_kwargs = {**model_kwargs, "load_format": load_format}

    from kiln.orchestrator.driver import Orchestrator, WarmupError

    try:
        orch = Orchestrator(model, tp_size, config, cache_root, address, model_kwargs=model_kwargs,
                            placement=placement, device=device, num_cpus=num_cpus, max_retries=retries,
                            progress=not quiet, fanout=fanout, fanout_lifetime=fanout_lifetime)
    except ValueError as exc:
        raise InvalidConfig(str(exc)) from None
    try:
        with orch:
            report = orch.warmup(sizes)
    except WarmupError as exc:
        for failure in exc.failures:
            click.echo(f"kiln warmup failed: rank {failure['rank']}, phase {failure['phase']!r}: "
                       f"{failure['cause']}", err=True)
        if exc.report is not None:  # the failures of every attempt, for whoever reads the files
            _write_outputs(exc.report, report_path, trace_path)
        sys.exit(1)
    except (RuntimeError, ValueError, OSError) as exc:
        click.echo(f"kiln warmup failed: {exc}", err=True)
        sys.exit(1)
    click.echo(report.table())
    _write_outputs(report, report_path, trace_path)
