"""The `specdm` command line: thin Typer commands, output on stderr/stdout, exit codes.

Heavy modules (torch, zarr, rasterio) are imported inside the commands so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from specdm_cli import __version__
from specdm_cli.config import (
    DIFFUSION_PRESETS,
    VAE_PRESETS,
    DemoBandSet,
    DemoVariant,
    Devices,
    Precision,
    Prediction,
    Progress,
    SamplerChoice,
    SourceName,
    StoreFormat,
    Task,
    TrainPreset,
    parse_devices,
    preset_help,
)
from specdm_cli.errors import (
    EXIT_RESOURCE,
    EXIT_SIGINT,
    EXIT_USAGE,
    ResourceError,
    SpecdmError,
    resource_error_from,
)

if TYPE_CHECKING:
    from specdm_cli.pipeline.synthesize.quality import JudgeMaker


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

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except USAGE_ERRORS as error:
            context = getattr(error, "ctx", None)
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
# soft_wrap: a log line (paths!) is never split at the terminal width, in a file or not.
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def _devices(value: str | Devices) -> Devices:
    """`--gpus`, parsed once for every command; a bad value is a usage error."""
    if isinstance(value, Devices):
        return value
    try:
        return parse_devices(value)
    except SpecdmError as error:
        raise typer.BadParameter(error.message) from None


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON summary on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.")]
GpusOption = Annotated[
    Devices,
    typer.Option(
        parser=_devices,
        metavar="0,1|cpu:N",
        show_default="CPU",
        help="CUDA devices, one process each (e.g. 0 or 0,1); cpu:N = N CPU processes.",
    ),
]
ThreadsOption = Annotated[int | None, typer.Option(min=1, help="CPU threads for torch.")]
PrecisionOption = Annotated[
    Precision | None, typer.Option(help="fp32, bf16, fp16 (CUDA only) [fp32].")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run of the same command.")
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an existing output of the same kind that specdm made."
    ),
]


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


@contextmanager
def _domain_errors() -> Iterator[None]:
    """Domain errors become one stderr line and their exit code; never a traceback."""
    try:
        yield
    except SpecdmError as error:
        stderr.print(error.line(), markup=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted: rerun with --resume", markup=False)
        raise typer.Exit(EXIT_SIGINT) from None
    except OSError as error:
        # Readers turn their own I/O errors into input errors; what is left is the output side.
        resource = resource_error_from(error) or ResourceError(
            f"cannot write ({error.strerror or error})", error.filename, "check --out"
        )
        stderr.print(resource.line(), markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_RESOURCE) from None
    except MemoryError:
        stderr.print("error: out of memory: use a smaller --batch-size or --workers", markup=False)
        raise typer.Exit(EXIT_RESOURCE) from None
    except Exception as error:
        if os.environ.get("SPECDM_DEBUG"):
            raise
        stderr.print(
            f"error: unexpected {type(error).__name__}: {error} "
            "(a bug: rerun with SPECDM_DEBUG=1 for a traceback and report it)",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


@contextmanager
def _progress(name: str, quiet: bool) -> Iterator[Progress]:
    """Progress on stderr fed by progress(stage, done, total): a rich bar on a terminal, plain
    unwrapped lines at a bounded rate in a log file; a new stage is named on its own line."""
    if quiet:
        yield lambda stage, done, total: None
    elif stderr.is_terminal:
        with _progress_bar(name) as update:
            yield update
    else:
        yield _progress_lines(name)


@contextmanager
def _progress_bar(name: str) -> Iterator[Progress]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TaskProgressColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Bar(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(name, total=None)
        stages: list[str] = []

        def update(stage: str, done: int, total: int) -> None:
            if stages[-1:] != [stage]:
                stages.append(stage)
                if stage != name:
                    stderr.print(f"{name}: {stage}", markup=False)
            bar.update(task, completed=done, total=total)

        yield update


# In a log file: a line at most every 10 s or every 5% of a stage, and at its end.
LOG_SECONDS = 10.0
LOG_FRACTION = 0.05


def _progress_lines(name: str) -> Progress:
    """Plain progress lines (step/total, rate, ETA) for stderr that is not a terminal."""
    state: dict[str, Any] = {"stage": None}

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != state["stage"]:
            state.update(stage=stage, start=now, start_done=done, last=now, last_done=done)
        due = now - state["last"] >= LOG_SECONDS or (
            total > 0 and done - state["last_done"] >= LOG_FRACTION * total
        )
        if not (due or done == total):
            return
        rate = (done - state["start_done"]) / max(now - state["start"], 1e-9)
        eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total > done else ""
        share = f" ({done / total:.0%})" if total > 0 else ""
        label = name if stage == name else f"{name}: {stage}"
        speed = f", {rate:.3g}/s" if rate > 0 else ""
        sys.stderr.write(f"{label} {done}/{total}{share}{speed}{eta}\n")
        sys.stderr.flush()
        state.update(last=now, last_done=done)

    return update


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@app.command()
def prepare(
    source: Annotated[SourceName, typer.Argument(help="segmunich, oscd, geotiff or demo.")],
    raw: Annotated[Path | None, typer.Argument(help="Raw data folder (not for demo).")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output store [./<source>.zarr; ./<source> for geotiff]."),
    ] = None,
    store_format: Annotated[StoreFormat, typer.Option("--format", help="Store format.")] = "zarr",
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    max_blank: Annotated[
        float, typer.Option(help="Drop patches with more zero/nodata image pixels than this.")
    ] = 0.5,
    max_unlabelled: Annotated[
        float | None,
        typer.Option(help="Drop patches with more unlabelled (255) pixels than this [off]."),
    ] = None,
    max_background: Annotated[
        float | None, typer.Option(help="Drop patches with more label-0 pixels than this.")
    ] = None,
    bands: Annotated[
        str | None, typer.Option(help="OSCD: comma-separated bands [the paper's 10].")
    ] = None,
    patch_size: Annotated[int, typer.Option(help="OSCD/GeoTIFF: patch size in pixels.")] = 256,
    overlap: Annotated[float, typer.Option(help="OSCD/GeoTIFF: patch overlap (paper: 0.6).")] = 0.6,
    nodata: Annotated[str | None, typer.Option(help="Nodata value (a number or 'nan').")] = None,
    label_nodata: Annotated[
        str | None,
        typer.Option(help="GeoTIFF/SegMunich: label value meaning no data (-> 255), e.g. -1."),
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
    ] = 0.1,
    test_fraction: Annotated[
        float | None, typer.Option(help="Fraction of source files for test [demo 0.1, else 0].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of split assignment and demo scenes.")] = 0,
    task: Annotated[Task, typer.Option(help="Demo: ss or cd.")] = "ss",
    n: Annotated[int, typer.Option("--n", min=1, help="Demo: number of scenes.")] = 512,
    size: Annotated[int, typer.Option(help="Demo: scene size in pixels.")] = 64,
    demo_bands: Annotated[
        DemoBandSet, typer.Option("--demo-bands", help="Demo: s2 (10 bands) or hsi (>=100).")
    ] = "s2",
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
    with _domain_errors():
        from specdm_cli.config import PrepareOptions
        from specdm_cli.pipeline.prepare.prepare import PrepareRequest, default_out
        from specdm_cli.pipeline.prepare.prepare import prepare as run_prepare
        from specdm_cli.pipeline.signals import graceful_stop

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
            test_fraction=_default_test_fraction(source, test_fraction),
            seed=seed,
            task=task,
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
        )
        with graceful_stop() as stop, _progress("prepare", quiet) as progress:
            summary = run_prepare(request, stop, progress, _warn(quiet))
        if not quiet:
            stderr.print(
                f"{summary.state}: {summary.out}: {summary.count} samples {summary.split_counts}, "
                f"removed {summary.removed or 'none'} of {summary.candidates}",
                markup=False,
            )
        if json_output:
            _emit_json(asdict(summary))


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated option as names; None when the option is not given."""
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _default_test_fraction(source: str, given: float | None) -> float:
    # Demo scenes are free, so they get a test split (80/10/10) for downstream evaluation.
    if given is not None:
        return given
    return 0.1 if source == "demo" else 0.0


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


@app.command()
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
) -> None:
    """Validate a store and summarise it: splits, bands, classes, provenance."""
    with _domain_errors():
        from specdm_cli.pipeline.inspect import inspect_store, store_schema

        if schema:
            _emit_json(store_schema())
            return
        if store is None:
            from specdm_cli.errors import UsageError

            raise UsageError("inspect needs a STORE", hint="run `specdm inspect PATH`")
        report = inspect_store(store, allow_incomplete, verify)
        if json_output:
            _emit_json(report)
        else:
            _render_inspect(report, Console(highlight=False))


def _render_inspect(report: dict[str, Any], console: Console) -> None:
    """The human-readable summary of `inspect_store`."""
    from rich.table import Table

    state = "complete" if report["complete"] else "INCOMPLETE"
    shape = report["shape"]
    console.print(
        f"[bold]{report['path']}[/] {report['format']} task={report['task']} {state}: "
        f"{report['count']} samples of {shape['bands']}x{shape['height']}x{shape['width']} "
        f"{report['dtype']}"
    )
    console.print(
        "splits: " + ", ".join(f"{k} {v}" for k, v in sorted(report["split_counts"].items()))
    )
    origin = report["source"] or report["model"] or {}
    console.print(f"from: {origin.get('dataset') or origin.get('run_id')}  crs: {report['crs']}")
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


def _config_or_usage_error(model: Any, **values: Any) -> Any:
    """Validate options into a pydantic config; the first problem becomes a usage error."""
    from pydantic import ValidationError

    from specdm_cli.errors import UsageError

    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + "-".join(str(first["loc"][0]).split("_")) if first["loc"] else "options"
        raise UsageError(f"{option}: {first['msg']}", hint="see --help") from None


def _counts(text: str | None, option: str, example: str) -> tuple[int, ...] | None:
    from specdm_cli.config import count_list

    return None if text is None else count_list(text, option, example)


def _preset_option(presets: dict[TrainPreset, dict[str, Any]]) -> Any:
    return typer.Option(
        help=f"Training recipe [cpu on the CPU, gpu with CUDA; a --resume keeps the run's]: "
        f"{preset_help(presets)}. Options given override it."
    )


def _recorded(run: Path | None, stage: str, resume: bool, model: Any) -> dict[str, Any] | None:
    """The options a run to resume was started with (None: not a resume of that stage)."""
    if not resume or run is None:
        return None
    from specdm_cli.pipeline.runs.rundirs import recorded_options

    return recorded_options(run, stage, model)


def _warn(quiet: bool) -> Callable[[str], None]:
    """Where a stage's warnings and notices go: stderr, or nowhere with --quiet."""
    return (lambda line: None) if quiet else (lambda line: stderr.print(line, markup=False))


def _train(
    name: str,
    stage: Callable[..., Any],
    request: Any,
    threads: int | None,
    quiet: bool,
    json_output: bool,
    done_line: Callable[[Any], str],
) -> None:
    """A training stage under Ctrl-C handling, the thread count and a progress bar; then its
    one-line outcome on stderr and, with --json, its summary on stdout."""
    from specdm_cli.pipeline.signals import graceful_stop
    from specdm_cli.pipeline.train.common import torch_threads

    with graceful_stop() as stop, torch_threads(threads), _progress(name, quiet) as bar:
        summary = stage(request, stop, bar, _warn(quiet))
    if not quiet:
        stderr.print(done_line(summary), markup=False)
    if json_output:
        _emit_json(asdict(summary))


def _val_loss(value: float | None, digits: int) -> str:
    return "" if value is None else f", val loss {value:.{digits}f}"


@app.command("fit-vae")
def fit_vae(
    store: Annotated[Path, typer.Argument(help="A prepared store.")],
    run: Annotated[
        Path | None, typer.Option(help="Run directory [<user data>/runs/<dataset>-<time>].")
    ] = None,
    preset: Annotated[TrainPreset | None, _preset_option(VAE_PRESETS)] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size [cpu 16, gpu 16, paper 48].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [cpu 1e-3; else 4.5e-6 x batch, LDM].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [the preset's].")] = None,
    kl_weight: Annotated[float | None, typer.Option(help="KL weight, LDM scale [1e-6].")] = None,
    sad_weight: Annotated[float | None, typer.Option(help="SAD weight [0.1, paper Eq. 1].")] = None,
    gradient_weight: Annotated[
        float | None,
        typer.Option(help="Weight of the L1 of the images' spatial differences; 0 = off [0]."),
    ] = None,
    class_weights: Annotated[str | None, typer.Option(help="none or auto [auto].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    workers: Annotated[
        int | None, typer.Option(help="Reader threads for the training batches [4].")
    ] = None,
    threads: ThreadsOption = None,
    val_every: Annotated[
        int | None, typer.Option(help="Validate every N steps [cpu 250, else 1000].")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps [cpu 250, else 1000].")
    ] = None,
    resume: ResumeOption = False,
    overwrite: OverwriteOption = False,
    split: Annotated[str | None, typer.Option(help="Split to train on [train].")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Train on the first N pairs (paper protocol).")
    ] = None,
    downsample: Annotated[
        int | None, typer.Option(help="Downsampling factor 2, 4 or 8 [4].")
    ] = None,
    image_latent_channels: Annotated[
        int | None, typer.Option(help="Image latent channels [4; paper 3, LDM kl-f4].")
    ] = None,
    mask_latent_channels: Annotated[
        int | None, typer.Option(help="Mask latent channels [3; the cd demo model 8].")
    ] = None,
    image_blocks: Annotated[
        str | None, typer.Option(help="Image VAE widths, e.g. 64,128,256 [the preset's].")
    ] = None,
    mask_blocks: Annotated[
        str | None, typer.Option(help="Mask VAE widths, e.g. 32,64,128 [the preset's].")
    ] = None,
    norm_groups: Annotated[
        int | None, typer.Option(help="GroupNorm groups [cpu 8, else 32].")
    ] = None,
    single_stream: Annotated[
        bool, typer.Option("--single-stream", help="LDM baseline: one VAE on image + one-hot mask.")
    ] = False,
    mask_aware_decoder: Annotated[
        bool,
        typer.Option(
            "--mask-aware-decoder", help="The image decoder also reads the mask latent [off]."
        ),
    ] = False,
    unlabelled_class: Annotated[
        bool,
        typer.Option(
            "--unlabelled-class",
            help="Sparse labels: learn where labels are absent (255), so synthesized masks "
            "leave it unlabelled rather than guess a class [off].",
        ),
    ] = False,
    augment: Annotated[str | None, typer.Option(help="d4 or none [d4].")] = None,
    semantic_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of a frozen segmenter's CE on decoded images; 0 = off [cpu 0.3, else 0]."
        ),
    ] = None,
    semantic_steps: Annotated[
        int | None, typer.Option(help="Training steps of that segmenter [300].")
    ] = None,
    adversarial_weight: Annotated[
        float | None, typer.Option(help="Patch-GAN weight (x LDM's adaptive weight); 0 = off [0].")
    ] = None,
    adversarial_start: Annotated[
        int | None, typer.Option(help="Step the patch-GAN term starts at [0].")
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the two-stream VAE (image and mask branches) on a store."""
    with _domain_errors():
        from specdm_cli.config import VAETrainConfig, train_values
        from specdm_cli.pipeline.train.fit_vae import FitVAERequest
        from specdm_cli.pipeline.train.fit_vae import fit_vae as run_fit_vae

        recorded = _recorded(run, "vae", resume, VAETrainConfig)
        values = train_values(VAE_PRESETS, preset, gpus, recorded, dict(
            batch_size=batch_size, lr=lr, steps=steps, kl_weight=kl_weight, sad_weight=sad_weight,
            gradient_weight=gradient_weight,
            class_weights=class_weights, seed=seed, precision=precision,
            val_every=val_every, checkpoint_every=checkpoint_every, split=split, limit=limit,
            workers=workers,
            downsample=downsample, image_latent_channels=image_latent_channels,
            mask_latent_channels=mask_latent_channels, norm_num_groups=norm_groups,
            image_block_out_channels=_counts(image_blocks, "--image-blocks", "16,32,32"),
            mask_block_out_channels=_counts(mask_blocks, "--mask-blocks", "8,16,16"),
            single_stream=single_stream or None, augment=augment,
            mask_aware_decoder=mask_aware_decoder or None,
            unlabelled_class=unlabelled_class or None,
            semantic_weight=semantic_weight, semantic_steps=semantic_steps,
            adversarial_weight=adversarial_weight, adversarial_start=adversarial_start,
        ))  # fmt: skip
        config = _config_or_usage_error(VAETrainConfig, **values)
        request = FitVAERequest(
            store=store, run=run, config=config, resume=resume, overwrite=overwrite, devices=gpus
        )
        _train("fit-vae", run_fit_vae, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run} at step {done.step}")  # fmt: skip


@app.command("fit-diffusion")
def fit_diffusion(
    run: Annotated[Path, typer.Argument(help="A run directory with a trained VAE.")],
    store: Annotated[Path | None, typer.Option(help="Store to encode [the VAE's store].")] = None,
    preset: Annotated[TrainPreset | None, _preset_option(DIFFUSION_PRESETS)] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size [cpu 32, gpu 32, paper 48].")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate [cpu 1e-3; else 2e-6 x batch, LDM].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [the preset's].")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay [0.9999, LDM].")] = None,
    snr_gamma: Annotated[
        float | None,
        typer.Option(
            help="Min-SNR loss weights; 0 = LDM's plain mean [5, Hang et al. 2023; paper 0]."
        ),
    ] = None,
    prediction: Annotated[
        Prediction | None,
        typer.Option(help="epsilon or v_prediction [cpu v_prediction; else epsilon, LDM]."),
    ] = None,
    unet_blocks: Annotated[
        str | None, typer.Option(help="U-Net widths [cpu 32,64,64; else by latent size].")
    ] = None,
    layers_per_block: Annotated[
        int | None, typer.Option(help="Res blocks per level [cpu 1, else 2].")
    ] = None,
    norm_groups: Annotated[
        int | None, typer.Option(help="GroupNorm groups [cpu 16, else 32].")
    ] = None,
    head_dim: Annotated[int | None, typer.Option(help="Attention head width [32].")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every N steps [1000].")
    ] = None,
    val_every: Annotated[
        int | None, typer.Option(help="EMA loss on the val latents every N steps [1000].")
    ] = None,
    val_samples: Annotated[int | None, typer.Option(help="Val samples encoded [256].")] = None,
    mask_condition_rate: Annotated[
        float | None,
        typer.Option(
            help="Fraction of training samples that also see their clean mask, so `synthesize "
            "--masks` can draw images for given masks; 0 = unconditioned [0]."
        ),
    ] = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    resume: ResumeOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train the denoising U-Net on the joint latents of a run's VAE."""
    with _domain_errors():
        from specdm_cli.config import DiffusionTrainConfig, train_values
        from specdm_cli.pipeline.train.fit_diffusion import FitDiffusionRequest
        from specdm_cli.pipeline.train.fit_diffusion import fit_diffusion as run_fit_diffusion

        recorded = _recorded(run, "diffusion", resume, DiffusionTrainConfig)
        values = train_values(DIFFUSION_PRESETS, preset, gpus, recorded, dict(
            batch_size=batch_size, lr=lr, steps=steps, seed=seed, precision=precision,
            ema_decay=ema_decay, snr_gamma=snr_gamma, prediction=prediction,
            block_out_channels=_counts(unet_blocks, "--unet-blocks", "32,64,64"),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_groups, attention_head_dim=head_dim, checkpoint_every=checkpoint_every,
            val_every=val_every, val_samples=val_samples, mask_condition_rate=mask_condition_rate,
        ))  # fmt: skip
        config = _config_or_usage_error(DiffusionTrainConfig, **values)
        request = FitDiffusionRequest(
            run=run, config=config, resume=resume, devices=gpus, store=store
        )
        _train("fit-diffusion", run_fit_diffusion, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run} at step {done.step} "
               f"(latent cache {done.cache}{_val_loss(done.val_loss, 4)})")  # fmt: skip


@app.command()
def distill(
    run: Annotated[Path, typer.Argument(help="A run directory with a trained U-Net.")],
    student_steps: Annotated[
        int | None, typer.Option(min=1, help="U-Net evaluations per sample of the student [4].")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps [1000].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size [32].")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [1e-4].")] = None,
    trajectories: Annotated[
        int | None, typer.Option(help="Teacher ODE trajectories to learn from [512].")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed [0].")] = None,
    precision: PrecisionOption = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    resume: ResumeOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Distill the run's U-Net into a few-step student (synthesize --sampler distilled)."""
    with _domain_errors():
        from specdm_cli.config import DistillTrainConfig
        from specdm_cli.pipeline.train.distill import DistillRequest
        from specdm_cli.pipeline.train.distill import distill as run_distill

        recorded = _recorded(run, "distill", resume, DistillTrainConfig) or {}
        given = dict(student_steps=student_steps, steps=steps, batch_size=batch_size, lr=lr,
                     trajectories=trajectories, seed=seed, precision=precision)  # fmt: skip
        values = {**recorded, **{k: v for k, v in given.items() if v is not None}}
        config = _config_or_usage_error(DistillTrainConfig, **values)
        request = DistillRequest(run=run, config=config, resume=resume, devices=gpus)
        _train("distill", run_distill, request, threads, quiet, json_output,
               lambda done: f"{done.state}: {done.run}, a {done.student_steps}-step student at "
               f"step {done.step}{_val_loss(done.val_loss, 5)}")  # fmt: skip


def _quality_judge() -> JudgeMaker:
    """The benchmark's judge, for `synthesize --min-quality` (synthesis may not import it)."""
    from specdm_cli.pipeline.benchmark.judge import QualityJudge

    return QualityJudge


@app.command()
def synthesize(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output store.")] = None,
    n: Annotated[int | None, typer.Option("--n", help="Number of pairs.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Run directory, or 'demo' [newest run of --task, else demo].")
    ] = None,
    task: Annotated[Task | None, typer.Option(help="ss or cd (picks the default model).")] = None,
    sampler: Annotated[
        SamplerChoice,
        typer.Option(
            help="auto (the run's distilled student if it has one, else dpmpp), ddpm (1000 "
            "steps, paper), ddim, dpmpp, unipc, distilled (specdm distill)."
        ),
    ] = "auto",
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Denoising steps [ddpm 1000, ddim 20, dpmpp 10, unipc 10; distilled: the student's].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: sample i depends only on (model, seed, i).")] = 0,
    batch_size: Annotated[
        str,
        typer.Option(
            help="B: the batch grid, fixed when the store is created; auto = the store's, else 16 on CPU, 64 on CUDA; at most --n unless --require/--min-quality filter draws."
        ),
    ] = "auto",
    precision: PrecisionOption = None,
    store_format: Annotated[StoreFormat, typer.Option("--format", help="Store format.")] = "zarr",
    shard: Annotated[
        str | None, typer.Option(help="Write shard i of N (i/N), on batch-grid lines.")
    ] = None,
    finalize: Annotated[
        Path | None, typer.Option(help="Merge the shard records of a store and finish it.")
    ] = None,
    overwrite: OverwriteOption = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted store (same options); a store with the same plan is joined anyway, as shards do.",
        ),
    ] = False,
    preview: Annotated[
        Path | None, typer.Option(help="Write a PNG grid of the first samples.")
    ] = None,
    require: Annotated[
        str | None,
        typer.Option(
            help="CLASS:MINFRAC[,...]: keep only samples with at least that fraction of each class."
        ),
    ] = None,
    masks: Annotated[
        Path | None,
        typer.Option(
            help="Draw images for the label maps of this store (same task, classes and size): "
            "sample i gets mask i mod M, written as given. Needs a model trained with "
            "--mask-condition-rate."
        ),
    ] = None,
    masks_split: Annotated[
        str | None, typer.Option(help="Only the --masks store's samples of this split [all].")
    ] = None,
    mask_guidance: Annotated[
        float | None,
        typer.Option(
            help="Classifier-free guidance weight with --masks; 1 = plain conditional, one "
            "U-Net pass a step instead of two [2, measured]."
        ),
    ] = None,
    min_quality: Annotated[
        float | None,
        typer.Option(
            help="Keep only samples whose quality score (benchmark's: 1 = as good as the typical "
            "real pair) reaches this, judged against --real; scores are written into the store."
        ),
    ] = None,
    real: Annotated[
        Path | None,
        typer.Option(help="With --min-quality: the real store the scores are calibrated on."),
    ] = None,
    feature_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="With --min-quality: the feature network's steps (as benchmark's)."
        ),
    ] = None,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Synthesize labelled pairs with a trained (or the shipped demo) model."""
    with _domain_errors():
        from specdm_cli.errors import UsageError

        if finalize is None and (out is None or n is None or n <= 0):
            # Before the heavy imports below: a usage error comes at once.
            raise UsageError(
                "synthesize needs --out and --n >= 1", hint="e.g. --n 1000 --out syn.zarr"
            )
        from specdm_cli.pipeline.signals import graceful_stop
        from specdm_cli.pipeline.synthesize.command import SynthesizeOptions, synthesize_store
        from specdm_cli.pipeline.synthesize.shards import finalize as finalize_store
        from specdm_cli.pipeline.train.common import torch_threads

        if finalize is not None:
            finalize_store(finalize, required=True)
            stderr.print(f"complete: {finalize}", markup=False)
            return
        assert out is not None and n is not None
        options = SynthesizeOptions(
            out=out, n=n, model=model, task=task, sampler=sampler, steps=steps, seed=seed,
            batch_size=batch_size, precision=precision or "fp32", format=store_format,
            shard=shard, devices=gpus, require=require, overwrite=overwrite, preview=preview,
            masks=masks, masks_split=masks_split, mask_guidance=mask_guidance,
            min_quality=min_quality, real=real, feature_steps=feature_steps,
            judge_maker=_quality_judge() if min_quality is not None else None,
        )  # fmt: skip
        with graceful_stop() as stop, torch_threads(threads), _progress("synthesize", quiet) as bar:
            summary = synthesize_store(options, stop, bar, _warn(quiet))
        if not quiet:
            state = "complete" if summary.complete else "shard done, store not complete yet"
            kept = f" (kept from {summary.draws} draws)" if summary.draws > summary.written else ""
            stderr.print(
                f"{state}: {summary.out}: {summary.written}/{summary.n} pairs{kept}, "
                f"{summary.pairs_per_second} pairs/s",
                markup=False,
            )
        if json_output:
            _emit_json(asdict(summary))


@app.command()
def benchmark(
    real: Annotated[
        Path | None, typer.Option(help="The real store (held-out splits compared).")
    ] = None,
    synthetic: Annotated[Path | None, typer.Option(help="The synthetic store to judge.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Run (or 'demo'): adds VAE reconstruction and pairs/s.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder [<synthetic>-benchmark].")
    ] = None,
    downstream: Annotated[
        bool,
        typer.Option("--downstream", help="Train on real / synthetic / both, test on real (slow)."),
    ] = False,
    real_limit: Annotated[
        int | None,
        typer.Option(min=1, help="Real train pairs downstream [paper: ss 2000, cd 100]."),
    ] = None,
    synthetic_ratio: Annotated[
        str, typer.Option(help="Synthetic pairs per real pair, e.g. 1,3,5 (Table 6).")
    ] = "5",
    downstream_seeds: Annotated[
        int, typer.Option(min=1, help="Seeds per downstream row (mean ± std).")
    ] = 3,
    downstream_max_steps: Annotated[
        int, typer.Option(min=1, help="Step cap per downstream training phase.")
    ] = 3000,
    downstream_patience: Annotated[
        int, typer.Option(min=1, help="Val evaluations without a better mIoU before stopping.")
    ] = 6,
    downstream_eval_every: Annotated[
        int, typer.Option(min=1, help="Steps between downstream val evaluations.")
    ] = 50,
    downstream_protocols: Annotated[
        str,
        typer.Option(
            help="How synthetic pairs join real ones: mixed, pretrain (and mixed-agree, pretrain-agree: relabelled)."
        ),
    ] = "mixed,pretrain",
    real_share: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Real share of a mixed downstream batch.")
    ] = 0.5,
    downstream_batch_size: Annotated[int, typer.Option(min=1, help="Downstream batch size.")] = 16,
    downstream_real_curve: Annotated[
        str | None,
        typer.Option(
            help="Also train real only on the first L real pairs for each L (e.g. 25,50,200): "
            "the learning curve that shows whether --real-limit leaves room for synthetic data."
        ),
    ] = None,
    round_trip_parts: Annotated[
        bool,
        typer.Option(
            "--round-trip-parts",
            help="With --model: also train on the round trip's images with the real labels, and "
            "on the real images with its labels (which VAE stream bounds the ceiling).",
        ),
    ] = False,
    write_scores: Annotated[
        bool,
        typer.Option(
            "--write-scores", help="Add a per-sample `quality` array to the synthetic store."
        ),
    ] = False,
    compare: Annotated[
        Path | None, typer.Option(help="Another report.json to put side by side.")
    ] = None,
    label: Annotated[str | None, typer.Option(help="Name of this side [store name].")] = None,
    feature_steps: Annotated[
        int | None, typer.Option(min=1, help="Feature network training steps [400].")
    ] = None,
    throughput_batches: Annotated[int, typer.Option(min=1, help="Batches timed for pairs/s.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per metrics batch.")] = 32,
    gpus: GpusOption = Devices(),  # noqa: B008 (an immutable value)
    threads: ThreadsOption = None,
    overwrite: OverwriteOption = False,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the report.json JSON Schema.")
    ] = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Report how good, how useful and how fast a synthetic dataset is."""
    with _domain_errors():
        from specdm_cli.config import DownstreamOptions, count_list, downstream_protocol_list
        from specdm_cli.errors import UsageError
        from specdm_cli.pipeline.benchmark.benchmark import BenchmarkRequest, rgb_notice
        from specdm_cli.pipeline.benchmark.benchmark import benchmark as run_benchmark
        from specdm_cli.pipeline.benchmark.render import print_tables
        from specdm_cli.pipeline.benchmark.report import report_json, report_schema
        from specdm_cli.pipeline.train.common import torch_threads

        if schema:
            _emit_json(report_schema())
            return
        if real is None or synthetic is None:
            raise UsageError(
                "benchmark needs --real and --synthetic",
                hint="e.g. --real real.zarr --synthetic syn.zarr",
            )
        ratios = count_list(synthetic_ratio, "--synthetic-ratio", "1,3,5")
        curve = _counts(downstream_real_curve, "--downstream-real-curve", "25,50,200") or ()
        if round_trip_parts and (model is None or not downstream):
            raise UsageError(
                "--round-trip-parts splits the VAE round-trip row, which needs --downstream and "
                "--model",
                hint="e.g. --downstream --model demo --round-trip-parts",
            )
        options = DownstreamOptions(
            batch_size=downstream_batch_size, seeds=downstream_seeds,
            eval_every=downstream_eval_every, patience=downstream_patience,
            max_steps=downstream_max_steps, real_share=real_share,
            protocols=downstream_protocol_list(downstream_protocols),
            real_limit=real_limit, ratios=ratios, real_curve=curve,
            round_trip_parts=round_trip_parts,
        )  # fmt: skip
        request = BenchmarkRequest(
            real=real, synthetic=synthetic, out=out, model=model,
            downstream=options if downstream else None, write_scores=write_scores,
            compare=compare, overwrite=overwrite, feature_steps=feature_steps, label=label,
            devices=gpus, throughput_batches=throughput_batches, batch_size=batch_size,
        )  # fmt: skip
        with torch_threads(threads), _progress("benchmark", quiet) as progress:
            report, folder = run_benchmark(request, progress)
        note = rgb_notice(real)
        if note is not None:
            _warn(quiet)(note)
        if json_output:
            sys.stdout.write(report_json(report, per_sample=False) + "\n")
        else:
            print_tables(report, Console(highlight=False))
        if not quiet:
            stderr.print(f"report: {folder / 'report.md'}", markup=False)


@app.command("filter")
def filter_command(
    store: Annotated[
        Path, typer.Argument(help="A store with quality scores (benchmark --write-scores).")
    ],
    min_quality: Annotated[
        float, typer.Option(help="Keep the samples scoring at least this (0..1).")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="The subset store.")] = None,
    overwrite: OverwriteOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write the subset of a store whose per-sample quality reaches --min-quality."""
    with _domain_errors():
        from specdm_cli.errors import UsageError
        from specdm_cli.pipeline.filter import FilterRequest, filter_store

        if out is None:
            raise UsageError("filter needs --out", hint="e.g. --out syn-good.zarr")
        with _progress("filter", quiet) as bar:
            summary = filter_store(FilterRequest(store, min_quality, out, overwrite), bar)
        if not quiet:
            stderr.print(
                f"complete: {summary.out}: kept {summary.kept} of {summary.parent_count} "
                f"(quality >= {summary.min_quality:g})",
                markup=False,
            )
        if json_output:
            _emit_json(asdict(summary))


def main() -> None:
    """Console-script entry point."""
    app()
