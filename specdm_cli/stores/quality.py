"""Per-sample quality scores on disk: a `quality` array (Zarr) or `quality.json` (GeoTIFF)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr

from specdm_cli.errors import InputDataError
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.manifest import Manifest, QualityScores
from specdm_cli.stores import StoreReader, open_writer
from specdm_cli.stores.tables import EVERY_CHUNK_STORED, missing_rows, table_damaged
from specdm_cli.stores.zarr_store import QUALITY_ARRAY, TABLE_CONFIG, table_codecs

__all__ = ["QUALITY_ARRAY", "QUALITY_FILE", "at_least", "read_quality", "write_quality"]
QUALITY_FILE = "quality.json"
RESCORE_HINT = "rerun `specdm benchmark --write-scores` on it"


def at_least(scores: np.ndarray, bar: float) -> np.ndarray:
    """Which scores reach `bar`, both rounded as a Zarr store keeps scores (float32): a bar typed
    as a stored score prints (0.29975167) keeps that sample, where the float64 bar was above its
    float32 score. A NaN score never passes."""
    with np.errstate(invalid="ignore"):
        passing: np.ndarray = np.asarray(scores, np.float32) >= np.float32(bar)
    return passing


def write_quality(
    root: Path, manifest: Manifest, scores: np.ndarray, info: QualityScores
) -> Manifest:
    """Store one score per sample (NaN where none) and name them in the manifest.

    The caller holds the store's lock. The manifest first forgets any earlier scores and names
    the new ones only once they are on disk, so a writer killed half-way leaves a store that
    says it has no scores rather than one with half-written scores.

    Returns:
        The manifest as saved.
    """
    values = np.asarray(scores, np.float32)
    if values.shape != (manifest.count,):
        raise ValueError(f"{values.shape[0]} scores for a store of {manifest.count} samples")
    writer = open_writer(root, manifest)
    if manifest.quality_scores is not None:
        writer.save_manifest(manifest.model_copy(update={"quality_scores": None}))
    if manifest.format == "zarr":
        group = zarr.open_group(root, mode="r+", zarr_format=3, use_consolidated=False)
        # A crc32c like every table (a garbled chunk is refused, not read as scores), and every
        # chunk stored, all-NaN ones too: a missing chunk is then damage, not "unscored".
        array = group.create_array(
            QUALITY_ARRAY, shape=values.shape, chunks=(manifest.batch_grid,), dtype="float32",
            fill_value=np.nan, dimension_names=("sample",), overwrite=True,
            compressors=table_codecs(), attributes={EVERY_CHUNK_STORED: True},
        )  # fmt: skip
        array.with_config(TABLE_CONFIG)[:] = values
    else:
        payload = {"quality": [None if np.isnan(v) else float(v) for v in values]}
        atomic_write_text(root / QUALITY_FILE, json.dumps(payload))
    final = manifest.model_copy(update={"quality_scores": info})
    writer.save_manifest(final)
    return final


def read_quality(reader: StoreReader) -> np.ndarray:
    """The (N,) float64 scores of a store (NaN = not scored); none written is an input error."""
    manifest = reader.manifest
    if manifest.quality_scores is None:
        raise InputDataError(
            "the store has no quality scores",
            reader.root,
            "run `specdm benchmark --write-scores` on it first",
        )
    try:
        if manifest.format == "zarr":
            values = _read_zarr_scores(reader)
        else:
            raw = json.loads((reader.root / QUALITY_FILE).read_text(encoding="utf-8"))["quality"]
            values = np.array([np.nan if v is None else v for v in raw], np.float64)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # blosc: Runtime
        raise InputDataError(
            f"unreadable quality scores ({exc})".splitlines()[0],
            reader.root,
            RESCORE_HINT,
        ) from None
    if values.shape != (manifest.count,):
        raise InputDataError(
            "quality scores do not match the store's sample count",
            reader.root,
            RESCORE_HINT,
        )
    return values


def _read_zarr_scores(reader: StoreReader) -> np.ndarray:
    """The `quality` array; a written sample's lost chunk is damage, not NaN ("unscored" is
    only ever an unwritten sample: benchmark scores every written one)."""
    group = zarr.open_group(reader.root, mode="r", zarr_format=3, use_consolidated=False)
    array = group[QUALITY_ARRAY]
    if not isinstance(array, zarr.Array):
        raise KeyError(QUALITY_ARRAY)
    values = np.asarray(array[:], np.float64)
    lost = missing_rows(array, reader.written())
    if lost.size:
        raise table_damaged(QUALITY_ARRAY, lost, reader.root, RESCORE_HINT)
    return values
