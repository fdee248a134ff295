"""`python -m specdm_cli` and the `specdm` command.

Importing the CLI takes most of a second (typer, rich); a Ctrl-C then must not print a
traceback, so the import happens here, under the same one-line handling as the commands.
"""

import os
import sys

from specdm_cli.faults import fault_point


def main() -> None:
    """Console-script entry point."""
    # torch's OpenMP threads spin between parallel regions by default: on a host whose cores
    # other jobs hold, the spinning threads fight them for the CPU (examples/bench_synthesize.py
    # --only threads). Sleeping waits must be chosen before torch loads OpenMP; a user's own
    # OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        fault_point("startup")
        from specdm_cli.cli import main as run_cli

        run_cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was written\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
