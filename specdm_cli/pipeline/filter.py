"""`specdm filter`: a subset store of the samples whose quality score reaches a threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.fs.atomic import remove_tree
from specdm_cli.fs.lock import DirLock, ReadLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.manifest import Manifest, ParentInfo
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.stores import (
    SampleMeta,
    StoreReader,
    create_store,
    open_store,
    open_writer,
    refuse_stream_out,
    resolve_target,
    store_sha256,
)
from specdm_cli.stores.base import Bounds
from specdm_cli.stores.quality import at_least, read_quality, write_quality


@dataclass(frozen=True)
class FilterRequest:
    """A validated `specdm filter` invocation."""

    store: Path
    min_quality: float
    out: Path
    overwrite: bool = False


@dataclass
class FilterSummary:
    out: str
    parent: str
    min_quality: float
    parent_count: int
    kept: int


def kept_indices(scores: np.ndarray, written: np.ndarray, min_quality: float) -> np.ndarray:
    """Written samples scoring at least `min_quality` (a NaN score never passes), in order."""
    kept: np.ndarray = written[at_least(scores[written], min_quality)]
    return kept


def filter_store(request: FilterRequest, progress: Progress | None = None) -> FilterSummary:
    """Copy the parent's samples scoring >= `min_quality` into a new store, complete at the end."""
    if not math.isfinite(request.min_quality) or not 0.0 <= request.min_quality <= 1.0:
        raise UsageError("--min-quality must lie in [0, 1]", hint="e.g. --min-quality 0.2")
    refuse_stream_out(request.out)
    refuse_overlap(request.out, {"STORE": request.store})
    with ReadLock(request.store):
        return _filter(request, progress)


def _filter(request: FilterRequest, progress: Progress | None) -> FilterSummary:
    reader = open_store(request.store)
    scores = read_quality(reader)
    kept = kept_indices(scores, reader.indices(None), request.min_quality)
    if kept.size == 0:
        best = np.nanmax(scores) if np.isfinite(scores).any() else math.nan
        raise InputDataError(
            f"no sample scores at least {request.min_quality:g} (best {best:.3f})",
            request.store,
            "lower --min-quality",
        )
    manifest = _subset_manifest(reader, kept, request)
    resolve_target(
        request.out, manifest.plan, resume=False, overwrite=request.overwrite, resumable=False
    )
    # A georeferenced parent gives a georeferenced subset: its CRS stays in the manifest, so
    # each kept sample's bounds (and the CF grid mapping, pixel centres) must come along.
    bounds = reader.bounds()
    create_store(request.out, manifest, int(kept.size), georeferenced=bounds is not None)
    try:
        with DirLock(request.out):
            _copy(reader, request.out, manifest, kept, bounds, progress)
            _finish(reader, request.out, manifest, kept, scores)
    except BaseException:
        # filter does not resume: a copy cut short (Ctrl-C, a damaged parent sample) is of no
        # use, and left there it would stand in the way of the same command again.
        remove_tree(request.out)
        raise
    return FilterSummary(
        str(request.out), str(request.store), request.min_quality, len(reader), int(kept.size)
    )


def _subset_manifest(reader: StoreReader, kept: np.ndarray, request: FilterRequest) -> Manifest:
    parent = reader.manifest
    parent_sha = store_sha256(reader.root)
    info = ParentInfo(
        path=str(request.store), manifest_sha256=parent_sha, min_quality=request.min_quality,
        parent_count=len(reader), kept=int(kept.size), parent_index=[int(i) for i in kept],
    )  # fmt: skip
    return parent.model_copy(
        update={
            "count": int(kept.size),
            "split_counts": {},
            "class_pixel_fraction": {},
            "plan": {
                "stage": "filter",
                "parent_manifest_sha256": parent_sha,
                "min_quality": request.min_quality,
            },
            "provenance": provenance(),
            "files": None,
            "quality_scores": None,
            "parent": info,
            "complete": False,
        }
    )


@dataclass(frozen=True)
class _ParentFacts:
    """The parent's per-sample tables, read once (each read checks the whole table)."""

    splits: np.ndarray
    fractions: np.ndarray
    ids: list[str] | None
    draws: np.ndarray | None
    bounds: np.ndarray | None

    def metas(self, chunk: np.ndarray) -> list[SampleMeta]:
        """Split, class fractions, source id, bounds and (synthetic) draw index of `chunk`:
        the subset still says where each sample came from and where it lies."""
        return [
            SampleMeta(
                str(self.splits[i]),
                self.fractions[i],
                self.ids[i] if self.ids is not None else None,
                bounds=_bounds_of(self.bounds, int(i)),
                candidate=int(self.draws[i]) if self.draws is not None else None,
            )
            for i in chunk
        ]


def _copy(
    reader: StoreReader,
    out: Path,
    manifest: Manifest,
    kept: np.ndarray,
    bounds: np.ndarray | None,
    progress: Progress | None,
) -> None:
    """Write the kept samples at positions 0..k-1, one batch-grid batch at a time."""
    writer = open_writer(out, manifest)
    facts = _ParentFacts(
        reader.splits(), reader.class_fractions(), reader.source_ids(), reader.candidates(), bounds
    )
    grid = manifest.batch_grid
    for start in range(0, kept.size, grid):
        chunk = kept[start : start + grid]
        metas = facts.metas(chunk)
        for position, (index, meta) in enumerate(zip(chunk, metas, strict=True), start=start):
            # GeoTIFF tiles carry their bounds themselves; Zarr keeps them in `bounds`.
            writer.write_arrays(position, reader.read(int(index)), meta.bounds)
        writer.mark_written(start, metas)
        if progress is not None:
            progress("filter", min(start + grid, int(kept.size)), int(kept.size))


def _bounds_of(bounds: np.ndarray | None, index: int) -> Bounds | None:
    """A sample's bounds as the writers take them; None where unknown (NaN) or not georeferenced."""
    if bounds is None or not np.isfinite(bounds[index]).all():
        return None
    west, south, east, north = (float(v) for v in bounds[index])
    return west, south, east, north


def _finish(
    reader: StoreReader, out: Path, manifest: Manifest, kept: np.ndarray, scores: np.ndarray
) -> None:
    """Scores of the kept samples, split counts and class fractions; then `complete: true`."""
    splits, fractions = reader.splits()[kept], reader.class_fractions()[kept]
    counts = {str(s): int((splits == s).sum()) for s in dict.fromkeys(splits.tolist())}
    per_split = {s: fractions[splits == s].mean(axis=0).tolist() for s in counts}
    per_split["all"] = fractions.mean(axis=0).tolist()
    parent_scores = reader.manifest.quality_scores
    assert parent_scores is not None  # read_quality checked it
    subset = manifest.model_copy(update={"split_counts": counts, "class_pixel_fraction": per_split})
    subset = write_quality(
        out, subset, scores[kept], parent_scores.model_copy(update={"count": int(kept.size)})
    )
    open_writer(out, subset).save_manifest(
        Manifest.model_validate(subset.model_copy(update={"complete": True}).model_dump())
    )
