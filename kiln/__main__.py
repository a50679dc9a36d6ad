"""`python -m kiln …`: the `kiln` command."""

from kiln.orchestrator.cli import main

main(prog_name="kiln")
