"""The `prepare` stage: raw dataset -> validated, resumable, canonical store."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from specdm_cli import __version__
from specdm_cli.config import Progress, StoreFormat
from specdm_cli.errors import (
    InputDataError,
    Interrupted,
    ResourceError,
    UsageError,
    reason_of,
    refuse_resume_with_overwrite,
)
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_stray_temporaries, remove_tree
from specdm_cli.fs.lock import DirLock, claim_output
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.fs.space import require_disk
from specdm_cli.manifest import (
    Manifest,
    SourceInfo,
    array_names,
    load_manifest,
)
from specdm_cli.pipeline.prepare.blocks import write_blocks
from specdm_cli.pipeline.prepare.left_out import (
    LEFT_OUT,
    left_out_records,
    refuse_left_out_now_present,
)
from specdm_cli.pipeline.prepare.notes import (
    no_held_out_warning,
    no_train_note,
    sparse_label_note,
    untrainable_note,
    untrained_classes_warning,
)
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.pipeline.prepare.resume import (
    manifest_fingerprint,
    refuse_changed_source,
    source_fingerprint,
)
from specdm_cli.pipeline.prepare.tally import PROGRESS_FILE, PrepareTally
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
)
from specdm_cli.sources.registry import NO_RAW, READERS, data_task
from specdm_cli.stores import (
    StoreWriter,
    create_store,
    default_store_path,
    forget_damaged,
    open_writer,
    refuse_overwrite_of_others,
    refuse_stream_out,
    resolve_target,
    stored_sample_bytes,
)
from specdm_cli.stores.base import MANIFEST_NAME
from specdm_cli.stores.open import manifest_in

# PrepareOptions fields newer than the plan format: absent from a plan while None.
_LATER_OPTIONS = frozenset({"label_nodata", "cities", "val_cities", "demo_variant"})
_PATH_OPTIONS = ("classes_file", "splits_file")


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare` did, for the terminal and `--json`."""

    out: str
    state: str
    count: int
    split_counts: dict[str, int]
    candidates: int
    removed: dict[str, int]
    nodata_pixels: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _plan(request: PrepareRequest) -> dict[str, Any]:
    """What a resume must match: the source, the raw path, every option that shapes the store."""
    options: dict[str, Any] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(request.options).items()
    }
    options = json.loads(json.dumps(options, default=list))
    # Options added later are left out while unset, so stores made before them still resume.
    options = {k: v for k, v in options.items() if not (k in _LATER_OPTIONS and v is None)}
    plan = {
        "stage": "prepare",
        "source": request.source,
        "raw": str(request.raw.resolve()) if request.raw else None,
        "format": request.format,
        "options": options,
        "max_blank": request.max_blank,
        "max_background": request.max_background,
        "batch_grid": request.batch_grid,
    }
    if request.max_unlabelled is not None:
        plan["max_unlabelled"] = request.max_unlabelled
    return plan


def _with_resolved_paths(request: PrepareRequest) -> PrepareRequest:
    """--classes and --splits resolved, as RAW is: the plan and the source's details record
    them, and the prepare-again hints quote them to run from any folder."""
    paths = {key: getattr(request.options, key) for key in _PATH_OPTIONS}
    resolved = {key: path.resolve() for key, path in paths.items() if path is not None}
    return replace(request, options=replace(request.options, **resolved))


def _with_paths_as_recorded(existing: Manifest | None, plan: dict[str, Any]) -> dict[str, Any]:
    """Stores made before the paths were resolved recorded --classes/--splits as given: where
    such a path names the same file from here, `plan` holds it as recorded, so the store resumes."""
    recorded_options = None if existing is None else existing.plan.get("options")
    if not isinstance(recorded_options, dict):
        return plan
    options = dict(plan["options"])
    for key in _PATH_OPTIONS:
        given = recorded_options.get(key)
        if isinstance(given, str) and options.get(key) == str(Path(given).resolve()):
            options[key] = given
    return {**plan, "options": options}


def _check_task(request: PrepareRequest) -> None:
    """`--task` names what the demo makes; of real data it must say what the data holds."""
    asked = request.task_asked
    if asked is None:
        return
    with _reading_raw(request.raw):
        found = data_task(request.source, request.raw)
    if found is not None and asked != found:
        raise UsageError(
            f"--task {asked}: the {request.source} data here is task {found}",
            hint="drop --task (the data decides it: images/+masks/ is ss, t1/+t2/+change/ cd)"
            if request.source == "geotiff"
            else "drop --task (the dataset decides it)",
        )


def default_out(source: str, store_format: StoreFormat) -> Path:
    """`--out` when not given: `./<source>.zarr`, or `./<source>` for GeoTIFF tiles."""
    return default_store_path(source, store_format)


def _validate(request: PrepareRequest) -> None:
    refuse_stream_out(request.out)
    refuse_resume_with_overwrite(request.resume, request.overwrite)
    if request.source not in READERS:
        known = ", ".join(sorted(READERS))
        raise UsageError(f"unknown source {request.source!r}", hint=f"use one of: {known}")
    if not 0.0 <= request.max_blank <= 1.0:
        raise UsageError("--max-blank must lie in [0, 1]", hint="e.g. --max-blank 0.5")
    if request.max_unlabelled is not None and not 0.0 <= request.max_unlabelled <= 1.0:
        raise UsageError("--max-unlabelled must lie in [0, 1]", hint="e.g. --max-unlabelled 0.9")
    if request.max_background is not None and not 0.0 <= request.max_background <= 1.0:
        raise UsageError("--max-background must lie in [0, 1]", hint="e.g. --max-background 0.9")
    if request.workers < 1:
        raise UsageError("--workers must be at least 1", hint="e.g. --workers 4")
    _check_raw(request.source, request.raw)
    refuse_overlap(request.out, {"RAW": request.raw})
    _check_ranges(request.options)


def _check_raw(source: str, raw: Path | None) -> None:
    if source in NO_RAW and raw is not None:
        raise UsageError(f"{source} takes no RAW folder", hint=f"run `specdm prepare {source}`")
    if source not in NO_RAW and raw is None:
        raise UsageError(f"{source} needs a RAW folder", hint=f"run `specdm prepare {source} PATH`")
    if raw is not None and not raw.exists():  # told before any word about the output
        raise InputDataError("folder does not exist", raw, "check the path")


def _check_ranges(options: PrepareOptions) -> None:
    if options.patch_size < 8:
        raise UsageError("--patch-size must be at least 8", hint="e.g. --patch-size 128")
    if not 0.0 <= options.overlap < 1.0:
        raise UsageError("--overlap must lie in [0, 1)", hint="e.g. --overlap 0.6")


def prepare(
    request: PrepareRequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    alert: Callable[[str], None] | None = None,
) -> PrepareSummary:
    """Run the prepare stage; resumable by sample index, locked, finished atomically.

    The reader's warnings go to `warn` as soon as the raw data is opened, and into the summary;
    those saying part of the raw data is left out go to `alert` (default `warn`): the CLI
    prints them even under --quiet, which silences progress, not missing data.
    A run that commits no sample (bad input, or filters that keep no patch) removes its store:
    there is nothing worth resuming, and a rerun with other options needs no --overwrite.
    """
    started = time.monotonic()
    _validate(request)
    request = _with_resolved_paths(request)
    plan = _plan(request)
    _check_task(request)  # before an --overwrite removes anything
    with claim_output(request.out):
        return _prepare(request, plan, stop, started, progress, warn, alert or warn)


def _prepare(
    request: PrepareRequest,
    plan: dict[str, Any],
    stop: StopFlag,
    started: float,
    progress: Progress | None,
    warn: Callable[[str], None] | None,
    alert: Callable[[str], None] | None,
) -> PrepareSummary:
    # With --overwrite the old store goes only once RAW and the options are read: a typo in
    # them (exit 3) left no store at all, and a real dataset's store takes hours to make.
    if not request.overwrite:
        existing = manifest_in(request.out)
        refuse_left_out_now_present(request.out, existing)
        plan = _with_paths_as_recorded(existing, plan)
    state = None if request.overwrite else resolve_target(request.out, plan, request.resume, False)
    if state == "done":
        return _summary(request.out, "already complete", started)
    if request.overwrite and request.out.exists():
        refuse_overwrite_of_others(request.out, "store", plan["stage"])
    source_plan, early = _read_source(request, stop, progress, warn, alert)
    if state is None:
        try:
            state = resolve_target(request.out, plan, request.resume, request.overwrite)
        except BaseException:
            source_plan.close()
            raise
    if state == "fresh":
        _require_room(request.out, source_plan)
        manifest = _initial_manifest(request, source_plan, plan)
        georeferenced = source_plan.spec.crs is not None
        create_store(request.out, manifest, len(source_plan.candidates), georeferenced)
    try:
        tally = _write(request, source_plan, stop, progress, state == "resume")
    except Exception as exc:
        # After bad input or a bug, a store this run created and filled with nothing is not
        # worth resuming; a fault of the machine (disk full, I/O, Ctrl-C) leaves it to
        # --resume, and a resumed store may hold samples its tally lost.
        fault = isinstance(exc, (OSError, ResourceError, Interrupted))
        if state == "fresh" and not fault and _load_tally(request.out).kept == 0:
            remove_tree(request.out)
        elif isinstance(exc, _BadFile):  # not a refusal: "raw data changed" is no file to fix
            _name_the_partial_store(exc, request.out)
        raise
    finally:
        source_plan.close()
    if not tally.kept:
        _remove_empty_store(request, tally)
    summary = _summary(request.out, "resumed" if state == "resume" else "created", started)
    notes = [
        note
        for note in (
            sparse_label_note(tally, source_plan.spec),
            no_train_note(request, tally),
            no_held_out_warning(request, tally),
            untrained_classes_warning(tally, source_plan.spec),
        )
        if note
    ]
    for note in notes:
        if warn is not None:
            warn(note)
    return replace(summary, warnings=[*early, *notes])


def _read_source(
    request: PrepareRequest,
    stop: StopFlag,
    progress: Progress | None,
    warn: Callable[[str], None] | None,
    alert: Callable[[str], None] | None,
) -> tuple[SourcePlan, list[str]]:
    """The source's plan of the raw data and the notes told before any sample is written."""
    with stop.while_planning(), _reading_raw(request.raw):
        source_plan = READERS[request.source](request.raw, request.options, progress)
    left_out = [part.warning for part in source_plan.left_out]
    for line in left_out:
        if alert is not None:
            alert(line)
    early = [*source_plan.warnings, *untrainable_note(request, source_plan.spec)]
    for line in early:
        if warn is not None:
            warn(line)
    early = [*left_out, *early]
    if not source_plan.candidates:
        source_plan.close()
        raise InputDataError("no samples found", request.raw, "check the folder layout")
    return source_plan, early


class _BadFile(InputDataError):
    """An input error met loading a sample: a file of the raw data to fix or leave out."""


def _telling_bad_files(load: Callable[[Candidate], RawSample]) -> Callable[[Candidate], RawSample]:
    """`load`, whose input errors are _BadFile: only they get the partial store's hint."""

    def told(candidate: Candidate) -> RawSample:
        try:
            return load(candidate)
        except _BadFile:
            raise
        except InputDataError as exc:
            raise _BadFile(exc.message, exc.path, exc.hint) from None

    return told


def _name_the_partial_store(error: InputDataError, out: Path) -> None:
    """Bad raw data met mid-run leaves the samples written so far: say so, and both ways on
    (an option the source's hint names, or leaving the sample out, changes the plan, which a
    --resume refuses)."""
    fix = error.hint or "fix the file"
    error.hint = (
        f"{fix}; {out} keeps the samples written so far: once the file itself is fixed, rerun "
        "the same command with --resume; with another option or the file left out, rerun with "
        "--overwrite"
    )


def _write(
    request: PrepareRequest,
    source_plan: SourcePlan,
    stop: StopFlag,
    progress: Progress | None,
    resumed: bool,
) -> PrepareTally:
    """Load, filter and write every remaining candidate under the store's lock."""
    with DirLock(request.out):
        remove_stray_temporaries(request.out)
        writer = open_writer(request.out, _load_incomplete(request.out))
        tally = _load_tally(request.out)
        if resumed and forget_damaged(request.out, range(tally.kept)):
            # The running statistics cannot skip a sample: start over (same bytes, in place).
            tally = PrepareTally()
        fingerprint = source_fingerprint(source_plan.spec, source_plan.candidates)
        if resumed:  # before the store is resized or written
            begun = tally.source if tally.kept else manifest_fingerprint(writer.manifest)
            refuse_changed_source(request, begun, fingerprint)
        tally.source = fingerprint
        if tally.kept == 0:  # a finished store shrank to its samples; a restart needs them all
            writer.truncate(len(source_plan.candidates))
        writer.forget_from(tally.kept)
        spec = source_plan.spec
        load = _telling_bad_files(source_plan.load)
        write_blocks(request, spec, source_plan.candidates, load, writer, tally, stop, progress)
        if tally.kept:
            _finish(writer, spec, tally)
    return tally


def _require_room(out: Path, source_plan: SourcePlan) -> None:
    """Refuse (exit 5) a store the disk cannot hold, from the plan's sizes, before writing
    (every candidate counts: the filters' share of dropped patches is not known yet)."""
    spec = source_plan.spec
    count = len(source_plan.candidates)
    per_sample = stored_sample_bytes(
        spec.task, len(spec.bands), spec.dtype, spec.height, spec.width
    )
    require_disk(
        float(count) * per_sample,
        out,
        f"the store ({count} patches of {spec.height}x{spec.width}, {len(spec.bands)} bands)",
        "free space or choose another --out; fewer patches: a larger --patch-size, --overlap 0",
    )


@contextmanager
def _reading_raw(raw: Path | None) -> Iterator[None]:
    """Opening the raw data only reads it, so a permission refused there is the input's (exit
    3), not an output that cannot be written (exit 5)."""
    try:
        yield
    except PermissionError as exc:
        raise InputDataError(
            f"cannot read the raw data ({exc.strerror or reason_of(exc)})",
            exc.filename or raw,
            "give your user read access to it (ls -l shows who has it)",
        ) from None


def _remove_empty_store(request: PrepareRequest, tally: PrepareTally) -> None:
    """Remove a store that kept no patch, so a rerun with other filters needs no --overwrite."""
    remove_tree(request.out)
    limits = {
        "blank": ("--max-blank", request.max_blank),
        "unlabelled": ("--max-unlabelled", request.max_unlabelled),
        "background": ("--max-background", request.max_background),
    }
    options = [limits[reason] for reason in sorted(tally.removed)] or list(limits.values())
    removed = ", ".join(
        f"{tally.removed[reason]} by {limits[reason][0]} {limits[reason][1]}"
        for reason in sorted(tally.removed)
    )
    raise InputDataError(
        f"every patch was removed by the filters ({removed}); no store was written",
        request.raw,
        f"relax {' / '.join(option for option, _ in options)} and rerun",
    )


def _load_incomplete(out: Path) -> Manifest:
    return load_manifest(out / MANIFEST_NAME)


def _load_tally(out: Path) -> PrepareTally:
    path = out / PROGRESS_FILE
    if not path.exists():
        return PrepareTally()
    return PrepareTally.from_json(json.loads(path.read_text(encoding="utf-8")))


def _initial_manifest(
    request: PrepareRequest, source_plan: SourcePlan, plan: dict[str, Any]
) -> Manifest:
    spec, capacity = source_plan.spec, len(source_plan.candidates)
    details = dict(spec.details)
    if source_plan.left_out:  # what a partial download lacked, for a rerun to notice
        details[LEFT_OUT] = left_out_records(source_plan.left_out)
    return Manifest(
        tool_version=__version__,
        format=request.format,
        task=spec.task,
        count=capacity,
        height=spec.height,
        width=spec.width,
        dtype=spec.dtype,
        arrays=list(array_names(spec.task)),
        bands=spec.bands,
        band_order_source=spec.band_order_source,
        rgb_bands=spec.rgb_bands,
        classes=spec.classes,
        crs=spec.crs,
        batch_grid=request.batch_grid,
        source=SourceInfo(
            dataset=spec.dataset,
            raw_path=plan["raw"],
            candidates=capacity,
            details=details,
        ),
        plan=plan,
        provenance=provenance(),
        complete=False,
    )


def _finish(writer: StoreWriter, spec: SourceSpec, tally: PrepareTally) -> None:
    """Shrink to the kept samples and write the complete manifest last."""
    writer.truncate(tally.kept)
    manifest = writer.manifest
    assert manifest.source is not None
    source = manifest.source.model_copy(
        update={
            "split_counts": dict(tally.split_counts),
            "removed": dict(tally.removed),
            "nodata_pixels": tally.nodata_pixels,
        }
    )
    final = manifest.model_copy(
        update={
            "count": tally.kept,
            "split_counts": dict(tally.split_counts),
            "class_pixel_fraction": tally.class_fractions(),
            "normalization": tally.normalization("train"),
            "source": source,
            "complete": True,
        }
    )
    fault_point("prepare.before_manifest")
    writer.save_manifest(Manifest.model_validate(final.model_dump()))
    (writer.root / PROGRESS_FILE).unlink(missing_ok=True)


def _summary(out: Path, state: str, started: float) -> PrepareSummary:
    manifest = load_manifest(out / MANIFEST_NAME)
    source = manifest.source or SourceInfo(dataset="?")
    return PrepareSummary(
        out=str(out),
        state=state,
        count=manifest.count,
        split_counts=manifest.split_counts,
        candidates=source.candidates,
        removed=source.removed,
        nodata_pixels=source.nodata_pixels,
        seconds=round(time.monotonic() - started, 3),
    )
