"""`python -m specdm_cli` and the `specdm` command.

Importing the CLI takes most of a second (typer, rich); a Ctrl-C then must not print a
traceback, so the import happens here, under the same one-line handling as the commands.
"""

import sys

from specdm_cli.faults import fault_point


def main() -> None:
    """Console-script entry point."""
    try:
        fault_point("startup")
        from specdm_cli.cli import main as run_cli

        run_cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
