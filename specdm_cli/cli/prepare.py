"""`specdm prepare` (raw files -> store) and `specdm inspect` (what a store holds)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from specdm_cli.cli.options import JsonOption, OverwriteOption, QuietOption, ResumeOption
from specdm_cli.cli.output import (
    StdoutConsole,
    Warnings,
    domain_errors,
    emit_json,
    progress_reporter,
    stderr,
)
from specdm_cli.config import (
    MAX_BLANK,
    DemoBandSet,
    DemoVariant,
    PrepareOptions,
    SourceName,
    StoreFormat,
    Task,
)
from specdm_cli.pipeline.signals import stop_at_once


def prepare(
    ctx: typer.Context,
    source: Annotated[SourceName, typer.Argument(help="segmunich, oscd, geotiff or demo.")],
    raw: Annotated[Path | None, typer.Argument(help="Raw data folder (not for demo).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output store [./<source>.zarr; ./<source> with --format geotiff]."
        ),
    ] = None,
    store_format: Annotated[StoreFormat, typer.Option("--format", help="Store format.")] = "zarr",
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    max_blank: Annotated[
        float, typer.Option(help="Drop patches with more zero/nodata image pixels than this.")
    ] = MAX_BLANK,
    max_unlabelled: Annotated[
        float | None,
        typer.Option(help="Drop patches with more unlabelled (255) pixels than this [off]."),
    ] = None,
    max_background: Annotated[
        float | None, typer.Option(help="Drop patches with more label-0 pixels than this.")
    ] = None,
    bands: Annotated[
        str | None,
        typer.Option(
            help="OSCD: comma-separated bands [the paper's 10]; GeoTIFF: bands to keep, by "
            "number or name (1-5,8-12) [all]."
        ),
    ] = None,
    patch_size: Annotated[
        int, typer.Option(help="OSCD/GeoTIFF: patch size in pixels.")
    ] = PrepareOptions.patch_size,
    overlap: Annotated[
        float, typer.Option(help="OSCD/GeoTIFF: patch overlap (paper: 0.6).")
    ] = PrepareOptions.overlap,
    nodata: Annotated[str | None, typer.Option(help="Nodata value (a number or 'nan').")] = None,
    label_nodata: Annotated[
        str | None,
        typer.Option(help="Label value meaning no data (-> 255), e.g. -1."),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="GeoTIFF: class codes, names, colours (JSON or CSV; RGB masks need colours)."
        ),
    ] = None,
    splits: Annotated[Path | None, typer.Option(help="GeoTIFF: CSV of stem,split.")] = None,
    cities: Annotated[
        str | None, typer.Option(help="OSCD: comma-separated cities to prepare [all listed].")
    ] = None,
    val_cities: Annotated[
        str | None,
        typer.Option(help="OSCD: comma-separated train cities for val (not --val-fraction)."),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Fraction of source files (OSCD: cities) for val.")
    ] = PrepareOptions.val_fraction,
    test_fraction: Annotated[
        float | None, typer.Option(help="Fraction of source files for test [demo 0.1, else 0].")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of split assignment and demo scenes.")
    ] = PrepareOptions.seed,
    task: Annotated[
        Task | None,
        typer.Option(help="Demo: ss or cd [ss]; other sources: checked against the data."),
    ] = None,
    n: Annotated[
        int, typer.Option("--n", min=1, help="Demo: number of scenes.")
    ] = PrepareOptions.n,
    size: Annotated[int, typer.Option(help="Demo: scene size in pixels.")] = PrepareOptions.size,
    demo_bands: Annotated[
        DemoBandSet, typer.Option("--demo-bands", help="Demo: s2 (10 bands) or hsi (>=100).")
    ] = PrepareOptions.band_set,
    demo_variant: Annotated[
        DemoVariant | None,
        typer.Option(
            "--demo-variant",
            help="Demo: standard, or hard (cropland, grassland and soil overlap spectrally; "
            "meadows are told from fields by shape) [standard].",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Reader threads.")] = 4,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Turn a raw dataset into a canonical, resumable store."""
    with domain_errors():
        from specdm_cli.config import default_test_fraction
        from specdm_cli.pipeline.prepare.prepare import default_out
        from specdm_cli.pipeline.prepare.prepare import prepare as run_prepare
        from specdm_cli.pipeline.prepare.request import PrepareRequest
        from specdm_cli.pipeline.signals import graceful_stop

        _refuse_options_the_source_ignores(source, ctx)
        _refuse_fractions_with_a_splits_file(ctx)
        options = PrepareOptions(
            bands=_names(bands),
            patch_size=patch_size,
            overlap=overlap,
            nodata=_parse_nodata(nodata),
            label_nodata=_parse_nodata(label_nodata, "--label-nodata"),
            cities=_names(cities),
            val_cities=_names(val_cities),
            classes_file=classes,
            splits_file=splits,
            val_fraction=val_fraction,
            test_fraction=default_test_fraction(source) if test_fraction is None else test_fraction,
            seed=seed,
            task=task or "ss",
            n=n,
            size=size,
            band_set=demo_bands,
            demo_variant=demo_variant,
        )
        request = PrepareRequest(
            source=source,
            raw=raw,
            out=out or default_out(source, store_format),
            format=store_format,
            options=options,
            max_blank=max_blank,
            max_unlabelled=max_unlabelled,
            max_background=max_background,
            resume=resume,
            overwrite=overwrite,
            workers=workers,
            task_asked=task,
        )
        warnings = Warnings(quiet)
        with graceful_stop() as stop, progress_reporter("prepare", quiet) as progress:
            summary = run_prepare(request, stop, progress, warnings, warnings.always)
        if not quiet:
            stderr.print(
                f"{summary.state}: {summary.out}: {summary.count} samples "
                f"({_counts(summary.split_counts)}), {sum(summary.removed.values())} of "
                f"{summary.candidates} patches removed by the filters"
                + (f" ({_counts(summary.removed)})" if summary.removed else ""),
                markup=False,
            )
        if json_output:
            emit_json(asdict(summary))


def _counts(counts: dict[str, int]) -> str:
    """`train 28, val 3`: a tally as words, not a Python dict."""
    return ", ".join(f"{name} {count}" for name, count in counts.items()) or "none"


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as names; None when the option is not given."""
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _read_by() -> dict[str, tuple[str, ...]]:
    """The sources that read each option, by its parameter name here (`--demo-bands`:
    demo_bands): one given to another source is refused, not silently dropped (SegMunich's
    128 px patches and its own split lists take no --patch-size or --val-fraction)."""
    from specdm_cli.config import PREPARE_FLAGS

    return {flag[2:].replace("-", "_"): readers for flag, readers in PREPARE_FLAGS.values()}


def _refuse_options_the_source_ignores(source: str, ctx: typer.Context) -> None:
    """Options given on the command line (or by environment) that `source` does not read."""
    from specdm_cli.errors import UsageError

    read_by = _read_by()
    ignored = [name for name in _given(ctx, read_by) if source not in read_by[name]]
    if ignored:
        options = ", ".join(_option(name) for name in ignored)
        readers = " / ".join(read_by[ignored[0]])
        raise UsageError(
            f"prepare {source} does not read {options} ({_option(ignored[0])} is for {readers})",
            hint=f"drop {options}, or check the source name",
        )


def _refuse_fractions_with_a_splits_file(ctx: typer.Context) -> None:
    """--val-fraction, --test-fraction or --seed given with --splits: they were silently unread."""
    from specdm_cli.config import SPLIT_BY_FRACTIONS
    from specdm_cli.errors import UsageError

    if not _given(ctx, ("splits",)):
        return
    unread = _given(ctx, SPLIT_BY_FRACTIONS)
    if unread:
        options = ", ".join(_option(name) for name in unread)
        raise UsageError(
            f"--splits gives every tile's split, so {options} would not be read",
            hint=f"drop {options}, or drop --splits to split by seeded fractions",
        )


def _given(ctx: typer.Context, names: Iterable[str]) -> list[str]:
    """Which of these parameters were given on the command line (or by environment), not
    left at their defaults."""
    # By name: typer's Context is its own click's, whose ParameterSource is not click's.
    sources = {name: ctx.get_parameter_source(name) for name in names}
    return [name for name, where in sources.items() if where and where.name != "DEFAULT"]


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_nodata(text: str | None, option: str = "--nodata") -> float | None:
    from specdm_cli.errors import UsageError

    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a number", hint=f"e.g. {option} 0 or {option} nan"
        ) from None


def inspect(
    store: Annotated[Path | None, typer.Argument(help="A prepared or synthetic store.")] = None,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the manifest JSON Schema.")
    ] = False,
    allow_incomplete: Annotated[
        bool, typer.Option("--allow-incomplete", help="Read a store whose writer stopped early.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Read every sample back against its checksums.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Validate a store and summarise it: splits, bands, classes, provenance."""
    with domain_errors(resumable=False), stop_at_once():
        from specdm_cli.errors import UsageError
        from specdm_cli.pipeline.inspect import inspect_store, store_schema

        if schema and store is not None:  # it was ignored: the schema read as the store's check
            raise UsageError(
                "--schema prints the manifest schema of every store; it reads no STORE",
                hint=f"drop --schema to inspect {store}, or drop {store}",
            )
        if schema:
            emit_json(store_schema())
            return
        if store is None:
            raise UsageError("inspect needs a STORE", hint="run `specdm inspect PATH`")
        # Only --verify takes long enough to tell (it reads every sample).
        with progress_reporter("inspect", quiet or not verify) as progress:
            report = inspect_store(store, allow_incomplete, verify, progress)
        if json_output:
            emit_json(report)
        else:
            _render_inspect(report, StdoutConsole())


def _render_inspect(report: dict[str, Any], console: Console) -> None:
    """The human-readable summary of `inspect_store`."""
    from rich.table import Table

    shape = report["shape"]
    # An unfinished store's count is its capacity: say how many are written (its split counts
    # come when it finishes).
    counted = (
        f"complete: {report['count']} samples of"
        if report["complete"]
        else f"INCOMPLETE: {report['written']} of {report['count']} samples written,"
    )
    console.print(
        f"[bold]{report['path']}[/] {report['format']} task={report['task']} {counted} "
        f"{shape['bands']}x{shape['height']}x{shape['width']} {report['dtype']}"
    )
    splits = ", ".join(f"{k} {v}" for k, v in sorted(report["split_counts"].items()))
    console.print(f"splits: {splits or 'not counted until the store is complete'}")
    origin = report["source"] or report["model"] or {}
    console.print(
        f"from: {origin.get('dataset') or origin.get('run_id')}  crs: {_crs_line(report)}"
    )
    content = report["content_sha256"]
    console.print(
        f"content sha256: {content}"
        if content
        else "content: no checksums (written before they existed)"
    )
    if "verified" in report:  # --verify: damage would have been an error instead
        console.print(f"verified: {report['verified']}")
    bands = Table("band", "wavelength (nm)", title="bands", title_justify="left")
    for band in report["bands"]:
        bands.add_row(band["name"], f"{band['wavelength_nm']:g}" if band["wavelength_nm"] else "-")
    classes = Table("index", "class", "code", "pixels", title="classes", title_justify="left")
    for item in report["classes"]:
        share = item["pixel_fraction"]
        classes.add_row(
            str(item["index"]),
            item["name"],
            str(item["code"]),
            f"{share:.1%}" if share is not None else "-",
        )
    console.print(bands, classes)


def _crs_line(report: dict[str, Any]) -> str:
    """The store's CRS; for files or cities in several, how many (the manifest lists them)."""
    details = (report["source"] or {}).get("details") or {}
    by_file = details.get("crs_by_file") or details.get("crs_by_city")
    if report["crs"] is not None or not by_file:
        return str(report["crs"])
    distinct = sorted({crs for crs in by_file.values() if crs})
    key = "crs_by_file" if "crs_by_file" in details else "crs_by_city"
    return f"{len(distinct)} CRSs ({', '.join(distinct[:3])}{', ...' if len(distinct) > 3 else ''}; source.details.{key})"
