"""Options several commands share, and turning option values into configs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from specdm_cli.config import Devices, Precision, TrainPreset, parse_devices, train_option
from specdm_cli.errors import SpecdmError, missing_run, missing_store
from specdm_cli.presets import preset_help, train_values


def parse_gpus(value: str | Devices) -> Devices:
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
        parser=parse_gpus,
        metavar="0,1|cpu:N",
        show_default="CPU",
        help="CUDA devices, one process each (e.g. 0 or 0,1); cpu:N = N CPU processes.",
    ),
]
# distill, fit-detail and benchmark run on one device (`Devices.one` refuses more): the help
# says so.
OneDeviceOption = Annotated[
    Devices,
    typer.Option(
        "--gpus",
        parser=parse_gpus,
        metavar="0|cpu",
        show_default="CPU",
        help="One CUDA device (e.g. 0); this command runs on one device.",
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


def config_or_usage_error(model: Any, **values: Any) -> Any:
    """Validate options into a pydantic config; the first problem becomes a usage error."""
    from pydantic import ValidationError

    from specdm_cli.errors import UsageError

    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as error:
        first = error.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else None
        message = str(first["msg"]).removeprefix("Value error, ")
        if field is not None:  # a check across options names them in its message
            message = f"{train_option(field)}: {message}"
        raise UsageError(message, hint="see --help") from None


def parse_counts(text: str | None, option: str, example: str) -> tuple[int, ...] | None:
    from specdm_cli.config import count_list

    return None if text is None else count_list(text, option, example)


def preset_option(presets: dict[TrainPreset, dict[str, Any]]) -> Any:
    return typer.Option(
        help=f"Training recipe [cpu on the CPU, gpu with CUDA; a --resume keeps the run's]: "
        f"{preset_help(presets)}. Options given override it."
    )


def train_config(
    model: Any,
    stage: str,
    given: dict[str, Any],
    *,
    run: Path | None,
    resume: bool,
    presets: dict[TrainPreset, dict[str, Any]] | None = None,
    preset: TrainPreset | None = None,
    devices: Devices = Devices(),  # noqa: B008 (an immutable value)
) -> Any:
    """A training command's config: a preset's values (where the stage has presets), a resumed
    run's recorded options, the options given (None: not given). The one place the three
    training commands resolve their options: a value the config refuses is a usage error (exit
    2), recorded options it refuses a damaged run (exit 4)."""
    recorded = _recorded_values(run, stage, resume, model)
    if presets is None:
        values = {**(recorded or {}), **{k: v for k, v in given.items() if v is not None}}
    else:
        values = train_values(presets, preset, devices, recorded, given)
    return config_or_usage_error(model, **values)


def _recorded_values(
    run: Path | None, stage: str, resume: bool, model: Any
) -> dict[str, Any] | None:
    """The options a run to resume was started with (None: not a resume of that stage)."""
    if not resume or run is None:
        return None
    from specdm_cli.pipeline.runs.rundirs import recorded_options

    return recorded_options(run, stage, model)


def require_inputs(
    stores: dict[str, Path | None] | None = None,
    runs: tuple[Path, ...] = (),
    models: tuple[str | None, ...] = (),
) -> None:
    """Input paths with nothing there, told before torch loads (seconds on a busy machine).
    `stores` by option name ("" for an argument); `models` are `--model` values, where `demo`
    names the shipped model, not a path."""
    for option, store in (stores or {}).items():
        if store is not None and not store.exists():
            raise missing_store(store, option)
    chosen = [Path(model) for model in models if model not in (None, "demo")]
    for run in (*runs, *chosen):
        if not run.exists():
            raise missing_run(run)
