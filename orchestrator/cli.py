"""The `kiln` command: `kiln warmup`, `kiln generate`, `kiln config …`, `kiln cache …`.

Subcommand groups live in their own modules and import heavy dependencies (torch, ray) inside
the command bodies, so `kiln cache ls` starts instantly.
"""

from __future__ import annotations

import click

from kiln import __version__
from kiln.orchestrator.cli_cache import cache_group
from kiln.orchestrator.cli_config import config_group
from kiln.orchestrator.cli_report import report_command
from kiln.orchestrator.cli_generate import generate_command
from kiln.orchestrator.cli_warmup import warmup_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="kiln")
def main() -> None:
    """kiln: compile PyTorch models piecewise on every rank, once, into a shared cache."""


main.add_command(config_group)
main.add_command(cache_group)
main.add_command(warmup_command)
main.add_command(report_command)
main.add_command(generate_command)

if __name__ == "__main__":  # pragma: no cover
    main()
