"""prepare's inner loop: load a block of patches while the last one is written, filter them
(blank, unlabelled, background), write the kept ones by sample index, account their statistics,
and record the block as the resume point."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.manifest import IGNORE_INDEX, LABEL_ARRAY, array_names
from specdm_cli.pipeline.prepare.request import PrepareRequest
from specdm_cli.pipeline.prepare.tally import PROGRESS_FILE, PrepareTally
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.sources.base import Candidate, RawSample, SourceSpec, class_fraction
from specdm_cli.stores import SampleMeta, StoreWriter


def _blocks(
    candidates: Sequence[Candidate], start: int, size: int
) -> Iterator[Sequence[Candidate]]:
    for first in range(start, len(candidates), size):
        yield candidates[first : first + size]


def write_blocks(
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
    counts those. Each share is of the pixels the source covers: a scene smaller than the
    patch is padded, and its padding is no one's blank or unlabelled land.
    """
    label = sample.arrays[LABEL_ARRAY[spec.task]]
    height, width = sample.covered or label.shape
    blank = ~_image_valid(sample, label.shape)[:height, :width]
    for name in array_names(spec.task)[:-1]:
        blank = blank | ~np.any(sample.arrays[name][:, :height, :width], axis=0)
    label = label[:height, :width]
    if float(blank.mean()) > request.max_blank:
        return "blank"
    unlabelled = float((label == IGNORE_INDEX).mean())
    if request.max_unlabelled is not None and unlabelled > request.max_unlabelled:
        return "unlabelled"
    if request.max_background is not None and float((label == 0).mean()) > request.max_background:
        return "background"
    return None
