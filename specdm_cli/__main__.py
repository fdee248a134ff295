"""`python -m specdm_cli` runs the CLI."""

from specdm_cli.cli import main

main()
