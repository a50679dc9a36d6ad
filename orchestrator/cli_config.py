"""`kiln config show|hash`: resolve a CompilationConfig (file + overrides); print it or its hash.

No torch import (workers.config has none), so these commands start instantly. Inductor passes
named in the config are imported, though, since their source is part of the hash.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence

import click

from kiln.workers.config import CompilationConfig
from kiln.workers.config.json_io import describe_config_error


class InvalidConfig(click.ClickException):
    """An invalid config: one line on stderr ("Error: …"), exit status 2 like a usage error."""

    exit_code = 2


def _resolve(file: str | None, overrides: Sequence[str]) -> CompilationConfig:
    # Warnings (deprecated flags, PIECEWISE → FULL) go to stderr as one line each, whatever the
    # interpreter's warning filters say: a CLI user should see why the config changed.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = CompilationConfig.from_cli(file, list(overrides))
        except ValueError as exc:  # pydantic's ValidationError, ConfigError, pass resolution
            raise InvalidConfig(describe_config_error(exc)) from None
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)
    return config


def _run(action):  # type: ignore[no-untyped-def]
    try:
        return action()
    except ValueError as exc:  # e.g. a pass without source (hash) or without a name (JSON)
        raise InvalidConfig(describe_config_error(exc)) from None


_file_argument = click.argument("file", required=False, type=click.Path(dir_okay=False))
_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a setting (repeatable): level=3, pass_config.enable_noop=false,"
    " compile_sizes=[1,2,4], cudagraph_mode=full. VALUE is JSON if it parses, else text.",
)


@click.group("config")
def config_group() -> None:
    """Show or hash a CompilationConfig (JSON file plus --set overrides)."""


@config_group.command("show")
@_file_argument
@_set_option
def show(file: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config as JSON (loadable back as a config file)."""
    config = _resolve(file, overrides)
    click.echo(_run(config.to_json))


@config_group.command("hash")
@_file_argument
@_set_option
@click.option("--factors", is_flag=True, help="Print the hashed factors as JSON before the hash.")
def hash_(file: str | None, overrides: tuple[str, ...], factors: bool) -> None:
    """Print the config hash (only what changes compiled code), alone on the last line."""
    config = _resolve(file, overrides)
    if factors:
        click.echo(json.dumps(_run(config.compile_factors), indent=2, sort_keys=True))
    click.echo(_run(config.compute_hash))
