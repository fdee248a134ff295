"""The Typer application: one-line usage errors, --version, the notes of lower layers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from specdm_cli import __version__
from specdm_cli.errors import EXIT_SIGINT, EXIT_SIGPIPE, EXIT_USAGE


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Click's UsageError: typer >= 0.29 vendors click, older releases use the click package."""
    found: list[type[Exception]] = []
    try:
        from typer._click.exceptions import UsageError as VendoredUsageError

        found.append(VendoredUsageError)
    except ImportError:
        pass
    try:
        from click import UsageError

        found.append(UsageError)
    except ImportError:
        pass
    return tuple(found)


USAGE_ERRORS = _usage_error_types()


class _OneLineUsageErrors(TyperGroup):
    """Usage errors as one stderr line with exit 2, instead of a multi-line panel."""

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # a reader that left is found here, not in the flush at exit
        except BrokenPipeError:
            # `specdm inspect STORE | head -1`: the reader has what it wanted. Click said exit
            # 1 with nothing on stderr; quiet, with the code `cat` gets in that pipe. Anything
            # written later goes nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_SIGPIPE) from None
        return result

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except USAGE_ERRORS as error:
            context = getattr(error, "ctx", None)
            if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
                # `specdm` alone: the help as --help prints it, still exit 2 (no command ran).
                sys.stdout.write(context.get_help() + "\n")
                sys.exit(EXIT_USAGE)
            where = context.command_path if context is not None else "specdm"
            message = " ".join(getattr(error, "format_message", error.__str__)().split())
            sys.stderr.write(f"error: {message} (see `{where} --help`)\n")
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            sys.stderr.write("interrupted: rerun with --resume\n")
            sys.exit(EXIT_SIGINT)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="specdm",
    help="Synthetic labelled multispectral datasets with SpecDM (two-stream latent diffusion).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # `specdm --install-completion` / `--show-completion`, as typer offers them.
    add_completion=True,
    # Help texts are plain text: "[default ...]" in them must print, not vanish as markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"specdm {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """specdm: prepare, fit, synthesize and benchmark labelled multispectral data."""
    # GDAL/libtiff report through these loggers; our own one-line errors say what matters.
    for library in ("rasterio", "tifffile"):
        logging.getLogger(library).addHandler(logging.NullHandler())
    _print_notes()


class _StderrNotes(logging.Handler):
    """Notes of the lower layers (a stale lock taken over, damaged samples rewritten), logged to
    the `specdm_cli` logger: the CLI prints them, one line each on the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _print_notes() -> None:
    notes = logging.getLogger("specdm_cli")
    if not any(isinstance(handler, _StderrNotes) for handler in notes.handlers):
        notes.addHandler(_StderrNotes())
        notes.setLevel(logging.INFO)
        notes.propagate = False
