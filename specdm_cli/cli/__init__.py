"""The `specdm` command line: thin Typer commands, output on stderr/stdout, exit codes.

One module per stage of the pipeline holds its commands (`prepare` also `inspect`, `train` the
training stages, `benchmark` also `filter`); they are registered below in the order
`specdm --help` lists them. Heavy modules (torch, zarr, rasterio) are imported inside the
commands so `--help` is instant.
"""

from specdm_cli.cli import benchmark, prepare, synthesize, train
from specdm_cli.cli.app import app

__all__ = ["app", "main"]

app.command()(prepare.prepare)
app.command()(prepare.inspect)
app.command("fit-vae")(train.fit_vae)
app.command("fit-diffusion")(train.fit_diffusion)
app.command()(train.distill)
app.command("fit-detail")(train.fit_detail)
app.command()(synthesize.synthesize)
app.command()(benchmark.benchmark)
app.command("filter")(benchmark.filter_command)


def main() -> None:
    """Console-script entry point."""
    app()
