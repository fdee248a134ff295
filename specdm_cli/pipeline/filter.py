"""`specdm filter`: a derived store of the samples whose quality score reaches a threshold,
and/or with their labels kept only where a segmenter trained on a real store agrees."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specdm_cli.config import DownstreamOptions, Progress
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.fs.lock import DirLock, ReadLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.manifest import LABEL_ARRAY, AgreementInfo, Manifest, ParentInfo
from specdm_cli.pipeline.benchmark.agreement import Referee, relabel_samples, train_referee
from specdm_cli.pipeline.benchmark.benchmark import open_pair
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.sources.base import class_fraction
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
from specdm_cli.stores.quality import read_quality, write_quality


@dataclass(frozen=True)
class FilterRequest:
    """A validated `specdm filter` invocation."""

    store: Path
    min_quality: float | None
    out: Path
    overwrite: bool = False
    agree_with: Path | None = None  # a real store: train the referee segmenter on its train split
    referee: DownstreamOptions = field(default_factory=DownstreamOptions)  # its rule and seed


@dataclass
class FilterSummary:
    out: str
    parent: str
    min_quality: float | None
    parent_count: int
    kept: int
    agree_with: str | None = None
    kept_pixel_share: float | None = None


def kept_indices(scores: np.ndarray, written: np.ndarray, min_quality: float) -> np.ndarray:
    """Written samples scoring at least `min_quality` (a NaN score never passes), in order."""
    with np.errstate(invalid="ignore"):
        passing = scores[written] >= min_quality
    kept: np.ndarray = written[passing]
    return kept


def filter_store(request: FilterRequest, progress: Progress | None = None) -> FilterSummary:
    """Copy the parent's samples scoring >= `min_quality` (all of them without it) into a new
    store, their labels relabelled by agreement with a segmenter trained on `agree_with` if
    given; `complete: true` at the end. The stores read are claimed for reading meanwhile."""
    _check(request)
    with (
        ReadLock(request.store),
        ReadLock(request.agree_with) if request.agree_with else nullcontext(),
    ):
        return _filter(request, progress)


def _filter(request: FilterRequest, progress: Progress | None) -> FilterSummary:
    reader = open_store(request.store)
    real = open_pair(request.agree_with, request.store)[0] if request.agree_with else None
    scores = read_quality(reader) if request.min_quality is not None else None
    kept = _kept(reader, scores, request)
    manifest = _subset_manifest(reader, kept, request, real)
    resolve_target(
        request.out, manifest.plan, resume=False, overwrite=request.overwrite, resumable=False
    )
    # Trained before the store is created: a failure leaves nothing that looks like output.
    referee = train_referee(real, request.referee, progress=progress) if real else None
    if referee is not None:
        manifest = _with_agreement(manifest, request, real, referee)
    create_store(request.out, manifest, int(kept.size), georeferenced=False)
    with DirLock(request.out):
        copied = _copy(reader, request.out, manifest, kept, referee, progress)
        _finish(reader, request.out, manifest, kept, scores, copied)
    return FilterSummary(
        str(request.out), str(request.store), request.min_quality, len(reader), int(kept.size),
        str(request.agree_with) if request.agree_with else None, copied.kept_share,
    )  # fmt: skip


def _check(request: FilterRequest) -> None:
    """Usage errors before anything is read: a threshold in [0, 1], something to do, an --out."""
    q = request.min_quality
    if q is None and request.agree_with is None:
        raise UsageError(
            "filter needs --min-quality or --agree-with (or both)",
            hint="e.g. --min-quality 0.2 or --agree-with real.zarr",
        )
    if q is not None and (not math.isfinite(q) or not 0.0 <= q <= 1.0):
        raise UsageError("--min-quality must lie in [0, 1]", hint="e.g. --min-quality 0.2")
    refuse_stream_out(request.out)
    refuse_overlap(request.out, {"STORE": request.store, "--agree-with": request.agree_with})


def _kept(reader: StoreReader, scores: np.ndarray | None, request: FilterRequest) -> np.ndarray:
    """The written samples that pass --min-quality (all written samples without it)."""
    written = reader.indices(None)
    if scores is None or request.min_quality is None:
        return written
    kept = kept_indices(scores, written, request.min_quality)
    if kept.size == 0:
        best = np.nanmax(scores) if np.isfinite(scores).any() else math.nan
        raise InputDataError(
            f"no sample scores at least {request.min_quality:g} (best {best:.3f})",
            request.store,
            "lower --min-quality",
        )
    return kept


def _subset_manifest(
    reader: StoreReader, kept: np.ndarray, request: FilterRequest, real: StoreReader | None
) -> Manifest:
    parent = reader.manifest
    parent_sha = store_sha256(reader.root)
    info = ParentInfo(
        path=str(request.store), manifest_sha256=parent_sha, min_quality=request.min_quality,
        parent_count=len(reader), kept=int(kept.size), parent_index=[int(i) for i in kept],
    )  # fmt: skip
    plan: dict[str, object] = {
        "stage": "filter",
        "parent_manifest_sha256": parent_sha,
        "min_quality": request.min_quality,
    }
    if real is not None:
        plan["agree_with_manifest_sha256"] = store_sha256(real.root)
        plan["referee_seed"] = request.referee.seed
    return parent.model_copy(
        update={
            "count": int(kept.size),
            "split_counts": {},
            "class_pixel_fraction": {},
            "plan": plan,
            "provenance": provenance(),
            "files": None,
            # Scores judged the parent's pairs; relabelled masks are other pairs.
            "quality_scores": None,
            "parent": info,
            "complete": False,
        }
    )


def _with_agreement(
    manifest: Manifest, request: FilterRequest, real: StoreReader | None, referee: Referee
) -> Manifest:
    """The manifest's parent record with how its labels are relabelled (kept share at the end)."""
    assert real is not None and manifest.parent is not None
    agreement = AgreementInfo(
        real_path=str(request.agree_with), real_manifest_sha256=store_sha256(real.root),
        seed=request.referee.seed, referee=referee.details,
    )  # fmt: skip
    parent = manifest.parent.model_copy(update={"agreement": agreement})
    return manifest.model_copy(update={"parent": parent})


@dataclass
class Copied:
    """What `_copy` wrote: each sample's class fractions and the label pixels it kept."""

    fractions: np.ndarray
    kept_pixels: int = 0
    labelled_pixels: int = 0
    relabelled: bool = False

    @property
    def kept_share(self) -> float | None:
        if not self.relabelled:
            return None
        return self.kept_pixels / self.labelled_pixels if self.labelled_pixels else 0.0


def _copy(
    reader: StoreReader,
    out: Path,
    manifest: Manifest,
    kept: np.ndarray,
    referee: Referee | None,
    progress: Progress | None,
) -> Copied:
    """Write the kept samples at positions 0..k-1, one batch-grid batch at a time."""
    writer = open_writer(out, manifest)
    splits, ids, draws = reader.splits(), reader.source_ids(), reader.candidates()
    copied = Copied(reader.class_fractions()[kept].copy(), relabelled=referee is not None)
    grid = manifest.batch_grid
    for start in range(0, kept.size, grid):
        chunk = kept[start : start + grid]
        labels = _judge(referee, reader, chunk, copied)
        for position, index in enumerate(chunk, start=start):
            writer.write_arrays(position, _relabelled(reader, int(index), labels, copied, position))
        # Synthetic samples keep their draw index: the subset still says where each came from.
        metas = [
            SampleMeta(
                str(splits[i]),
                copied.fractions[position],
                ids[i] if ids is not None else None,
                candidate=int(draws[i]) if draws is not None else None,
            )
            for position, i in enumerate(chunk, start=start)
        ]
        writer.mark_written(start, metas)
        if progress is not None:
            progress("filter", min(start + grid, int(kept.size)), int(kept.size))
    return copied


def _judge(
    referee: Referee | None, reader: StoreReader, chunk: np.ndarray, copied: Copied
) -> dict[int, np.ndarray] | None:
    """The referee's agreement labels of `chunk` (None without one), counted into `copied`."""
    if referee is None:
        return None
    judged = relabel_samples(referee, reader, chunk)
    copied.kept_pixels += judged.kept_pixels
    copied.labelled_pixels += judged.labelled_pixels
    return judged.labels


def _relabelled(
    reader: StoreReader,
    index: int,
    labels: dict[int, np.ndarray] | None,
    copied: Copied,
    position: int,
) -> dict[str, np.ndarray]:
    """Sample `index`'s arrays, its label replaced by the agreement label if there is one."""
    arrays = reader.read(index)
    if labels is None:
        return arrays
    label = labels[index]
    copied.fractions[position] = class_fraction(label, copied.fractions.shape[1])
    return {**arrays, LABEL_ARRAY[reader.manifest.task]: label}


def _finish(
    reader: StoreReader,
    out: Path,
    manifest: Manifest,
    kept: np.ndarray,
    scores: np.ndarray | None,
    copied: Copied,
) -> None:
    """Scores of the kept samples, split counts, class fractions, the kept label share; then
    `complete: true`."""
    splits, fractions = reader.splits()[kept], copied.fractions
    counts = {str(s): int((splits == s).sum()) for s in dict.fromkeys(splits.tolist())}
    per_split = {s: fractions[splits == s].mean(axis=0).tolist() for s in counts}
    per_split["all"] = fractions.mean(axis=0).tolist()
    subset = manifest.model_copy(update={"split_counts": counts, "class_pixel_fraction": per_split})
    parent = subset.parent
    if parent is not None and parent.agreement is not None:
        agreement = parent.agreement.model_copy(update={"kept_share": copied.kept_share})
        parent = parent.model_copy(update={"agreement": agreement})
        subset = subset.model_copy(update={"parent": parent})
    if scores is not None and not copied.relabelled:
        parent_scores = reader.manifest.quality_scores
        assert parent_scores is not None  # read_quality checked it
        subset = write_quality(
            out, subset, scores[kept], parent_scores.model_copy(update={"count": int(kept.size)})
        )
    open_writer(out, subset).save_manifest(
        Manifest.model_validate(subset.model_copy(update={"complete": True}).model_dump())
    )
