"""The `prepare` stage: raw dataset -> validated, resumable, canonical store."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from specdm_cli import __version__
from specdm_cli.config import Progress, StoreFormat
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import atomic_write_text, remove_stray_temporaries, remove_tree
from specdm_cli.fs.lock import DirLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.fs.space import require_disk
from specdm_cli.manifest import (
    IGNORE_INDEX,
    LABEL_ARRAY,
    Manifest,
    SourceInfo,
    array_names,
    load_manifest,
)
from specdm_cli.pipeline.prepare.tally import PrepareTally
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    class_fraction,
)
from specdm_cli.sources.registry import NO_RAW, READERS
from specdm_cli.stores import (
    SampleMeta,
    StoreWriter,
    create_store,
    default_store_path,
    forget_damaged,
    open_writer,
    refuse_stream_out,
    resolve_target,
    stored_sample_bytes,
)
from specdm_cli.stores.base import MANIFEST_NAME

PROGRESS_FILE = ".specdm/prepare-progress.json"
# PrepareOptions fields newer than the plan format: absent from a plan while None.
_LATER_OPTIONS = frozenset({"label_nodata", "cities", "val_cities", "demo_variant"})


@dataclass(frozen=True)
class PrepareRequest:
    """A validated `specdm prepare` invocation."""

    source: str
    raw: Path | None
    out: Path
    format: Literal["zarr", "geotiff"]
    options: PrepareOptions
    max_blank: float = 0.5
    max_unlabelled: float | None = None
    max_background: float | None = None
    resume: bool = False
    overwrite: bool = False
    workers: int = 4
    # Samples per block of per-sample tables and per progress record: small enough that a
    # resume loses little, large enough that the tables are not rewritten per sample.
    batch_grid: int = 64


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


def default_out(source: str, store_format: StoreFormat) -> Path:
    """`--out` when not given: `./<source>.zarr`, or `./<source>` for GeoTIFF tiles."""
    return default_store_path(source, store_format)


def _validate(request: PrepareRequest) -> None:
    refuse_stream_out(request.out)
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
) -> PrepareSummary:
    """Run the prepare stage; resumable by sample index, locked, finished atomically.

    The reader's warnings go to `warn` as soon as the raw data is opened, and into the summary.
    A run that commits no sample (bad input, or filters that keep no patch) removes its store:
    there is nothing worth resuming, and a rerun with other options needs no --overwrite.
    """
    started = time.monotonic()
    _validate(request)
    plan = _plan(request)
    state = resolve_target(request.out, plan, request.resume, request.overwrite)
    if state == "done":
        return _summary(request.out, "already complete", started)
    with stop.while_planning():
        source_plan = READERS[request.source](request.raw, request.options)
    for line in source_plan.warnings:
        if warn is not None:
            warn(line)
    if not source_plan.candidates:
        raise InputDataError("no samples found", request.raw, "check the folder layout")
    if state == "fresh":
        _require_room(request.out, source_plan)
        manifest = _initial_manifest(request, source_plan.spec, plan, len(source_plan.candidates))
        georeferenced = source_plan.spec.crs is not None
        create_store(request.out, manifest, len(source_plan.candidates), georeferenced)
    try:
        tally = _write(request, source_plan, stop, progress, state == "resume")
    except InputDataError:
        # Only a store this run created: a resumed one may hold samples its tally lost.
        if state == "fresh" and _load_tally(request.out).kept == 0:
            remove_tree(request.out)
        raise
    if not tally.kept:
        _remove_empty_store(request, tally)
    summary = _summary(request.out, "resumed" if state == "resume" else "created", started)
    sparse = _sparse_label_note(tally, source_plan.spec)
    if sparse and warn is not None:
        warn(sparse)
    return replace(summary, warnings=[*source_plan.warnings, *([sparse] if sparse else [])])


# From this share of unlabelled train pixels on, `prepare` points at `fit-vae --unlabelled-class`.
SPARSE_LABEL_SHARE = 0.2


def _sparse_label_note(tally: PrepareTally, spec: SourceSpec) -> str | None:
    """A note when most train labels are absent where the image is real (nodata and padding
    are not missing labels): the paper's mask branch decodes a class in every pixel, so
    synthesized masks would guess where the real ones say nothing."""
    pixels = tally.split_counts.get("train", 0) * spec.height * spec.width
    if not pixels:
        return None
    unlabelled = tally.unlabelled_train_pixels / pixels
    if unlabelled < SPARSE_LABEL_SHARE:
        return None
    return (
        f"note: {unlabelled:.0%} of the train label pixels are unlabelled (255); "
        "`fit-vae --unlabelled-class` keeps synthesized masks from guessing classes there"
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
        if tally.kept == 0:  # a finished store shrank to its samples; a restart needs them all
            writer.truncate(len(source_plan.candidates))
        writer.forget_from(tally.kept)
        spec = source_plan.spec
        _run_blocks(
            request, spec, source_plan.candidates, source_plan.load, writer, tally, stop, progress
        )
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


def _remove_empty_store(request: PrepareRequest, tally: PrepareTally) -> None:
    """Remove a store that kept no patch, so a rerun with other filters needs no --overwrite."""
    remove_tree(request.out)
    raise InputDataError(
        f"every patch was removed by the filters ({tally.removed}); no store was written",
        request.raw,
        "relax --max-blank / --max-unlabelled / --max-background and rerun",
    )


def _load_incomplete(out: Path) -> Manifest:
    return load_manifest(out / MANIFEST_NAME)


def _load_tally(out: Path) -> PrepareTally:
    path = out / PROGRESS_FILE
    if not path.exists():
        return PrepareTally()
    return PrepareTally.from_json(json.loads(path.read_text(encoding="utf-8")))


def _initial_manifest(
    request: PrepareRequest, spec: SourceSpec, plan: dict[str, Any], capacity: int
) -> Manifest:
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
            details=spec.details,
        ),
        plan=plan,
        provenance=provenance(),
        complete=False,
    )


def _blocks(
    candidates: Sequence[Candidate], start: int, size: int
) -> Iterator[Sequence[Candidate]]:
    for first in range(start, len(candidates), size):
        yield candidates[first : first + size]


def _run_blocks(
    request: PrepareRequest,
    spec: SourceSpec,
    candidates: Sequence[Candidate],
    load: Callable[[Candidate], RawSample],
    writer: StoreWriter,
    tally: PrepareTally,
    stop: StopFlag,
    progress: Progress | None,
) -> None:
    """Load and write in one thread pool: block k+1 loads while block k is written."""
    with ThreadPoolExecutor(max_workers=request.workers) as pool:
        block = _BlockWriter(request, spec, writer, tally, pool)
        pending: list[Future[RawSample]] | None = None
        for chunk in _blocks(candidates, tally.candidates_done, request.batch_grid):
            upcoming = [pool.submit(load, c) for c in chunk]
            if pending is not None:
                block.write([f.result() for f in pending])
                stop.check()
            pending = upcoming
            if progress:
                progress("prepare", tally.candidates_done, len(candidates))
        if pending is not None:
            block.write([f.result() for f in pending])
        if progress:
            progress("prepare", tally.candidates_done, len(candidates))


@dataclass
class _BlockWriter:
    """Filters, writes and accounts one block at a time; its progress record is the resume point."""

    request: PrepareRequest
    spec: SourceSpec
    writer: StoreWriter
    tally: PrepareTally
    pool: ThreadPoolExecutor

    def write(self, samples: list[RawSample]) -> None:
        kept = [sample for sample in samples if self._keep(sample)]
        start = self.tally.kept
        writes = [
            self.pool.submit(self.writer.write_arrays, start + offset, s.arrays, s.bounds)
            for offset, s in enumerate(kept)
        ]
        metas = [self._account(sample) for sample in kept]
        for done in writes:
            done.result()
        if metas:
            self.writer.mark_written(start, metas)
        self.tally.kept += len(metas)
        self.tally.candidates_done += len(samples)
        atomic_write_text(self.writer.root / PROGRESS_FILE, json.dumps(self.tally.to_json()))
        fault_point("prepare.after_block")

    def _keep(self, sample: RawSample) -> bool:
        _check_shapes(sample, self.spec)
        self.tally.nodata_pixels += sample.nodata_pixels
        reason = _removal_reason(sample, self.spec, self.request)
        if reason is not None:
            self.tally.removed[reason] = self.tally.removed.get(reason, 0) + 1
        return reason is None

    def _account(self, sample: RawSample) -> SampleMeta:
        label = sample.arrays[LABEL_ARRAY[self.spec.task]]
        tally, classes = self.tally, len(self.spec.classes)
        tally.split_counts[sample.split] = tally.split_counts.get(sample.split, 0) + 1
        tally.add_class_pixels(sample.split, label, classes)
        if sample.split == "train":
            images = [sample.arrays[name] for name in array_names(self.spec.task)[:-1]]
            image_valid = _image_valid(sample, label.shape)
            tally.add_band_moments(images, image_valid)
            tally.unlabelled_train_pixels += int(((label == IGNORE_INDEX) & image_valid).sum())
        return SampleMeta(
            split=sample.split,
            class_fraction=class_fraction(label, classes),
            source_id=sample.source_id,
            bounds=sample.bounds,
        )


def _check_shapes(sample: RawSample, spec: SourceSpec) -> None:
    """A reader's sample must match the spec, else the store would be inconsistent."""
    for name in array_names(spec.task):
        array = sample.arrays.get(name)
        expected = (
            (spec.height, spec.width)
            if name == LABEL_ARRAY[spec.task]
            else (len(spec.bands), spec.height, spec.width)
        )
        if array is None or array.shape != expected:
            found = None if array is None else array.shape
            raise InputDataError(
                f"sample {sample.source_id}: {name} has shape {found}, expected {expected}",
                hint="all samples of a dataset must share bands and size",
            )


def _image_valid(sample: RawSample, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool: pixels whose image values are real (neither nodata nor padding)."""
    if sample.image_nodata is None:
        return np.ones(shape, dtype=bool)
    return ~sample.image_nodata


def _removal_reason(sample: RawSample, spec: SourceSpec, request: PrepareRequest) -> str | None:
    """Why a patch is dropped (the paper removes mostly blank patches; section 4.1), or None.

    Blank is the image's business only (zero in every band, or nodata): a sparse reference
    mask leaves most pixels unlabelled (255) without them being blank; `--max-unlabelled`
    counts those.
    """
    label = sample.arrays[LABEL_ARRAY[spec.task]]
    blank = ~_image_valid(sample, label.shape)
    for name in array_names(spec.task)[:-1]:
        blank = blank | ~np.any(sample.arrays[name], axis=0)
    if float(blank.mean()) > request.max_blank:
        return "blank"
    unlabelled = float((label == IGNORE_INDEX).mean())
    if request.max_unlabelled is not None and unlabelled > request.max_unlabelled:
        return "unlabelled"
    if request.max_background is not None and float((label == 0).mean()) > request.max_background:
        return "background"
    return None


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
