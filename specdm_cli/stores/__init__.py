"""Samples <-> disk: Zarr and GeoTIFF stores, their lifecycle (create, resume, overwrite) and locks."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Literal

import numpy as np

from specdm_cli.config import PREPARE_FLAGS, Progress, StoreFormat
from specdm_cli.errors import (
    InputDataError,
    UsageError,
    missing_store,
    refuse_resume_with_overwrite,
)
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_abandoned_creations, remove_tree
from specdm_cli.fs.lock import DirLock, refuse_if_locked
from specdm_cli.fs.paths import file_sha256
from specdm_cli.manifest import (
    IMAGE_ARRAYS,
    LABEL_ARRAY,
    Manifest,
    Task,
    array_names,
    load_manifest,
)
from specdm_cli.stores.base import MANIFEST_NAME, SampleMeta, StoreReader, StoreWriter
from specdm_cli.stores.geotiff_store import GeoTiffReader, GeoTiffWriter, create_geotiff
from specdm_cli.stores.hints import incomplete_hint, repair_hint
from specdm_cli.stores.tables import shown_samples, table_damaged
from specdm_cli.stores.zarr_store import QUALITY_ARRAY, ZarrReader, ZarrWriter, _array, create_zarr

__all__ = [
    "SampleMeta",
    "StoreReader",
    "StoreWriter",
    "create_store",
    "default_store_path",
    "find_damaged",
    "open_store",
    "open_writer",
    "refuse_stream_out",
    "resolve_target",
]

TargetState = Literal["fresh", "resume", "done"]
OutputKind = Literal["store", "run"]

# Notes for the user: the CLI prints them (stages and stores print nothing themselves).
log = logging.getLogger(__name__)


def open_store(path: Path, allow_incomplete: bool = False) -> StoreReader:
    """Open a store of either format for reading; an incomplete one only when asked for."""
    if not path.exists():
        raise missing_store(path)
    if not path.is_dir():
        raise InputDataError(
            "not a store: a store is a folder (Zarr, or GeoTIFF tiles with manifest.json)",
            path,
            "name the folder `specdm prepare` or `specdm synthesize` wrote",
        )
    manifest = load_manifest(path / MANIFEST_NAME)
    if not manifest.complete and not allow_incomplete:
        raise incomplete_store(path, manifest)
    if manifest.format == "zarr":
        return ZarrReader(path, manifest)
    return GeoTiffReader(path, manifest)


def incomplete_store(path: Path, manifest: Manifest) -> InputDataError:
    """A store its writer left incomplete, with the command that completes it."""
    return InputDataError(
        "store is incomplete (its writer stopped early)", path, incomplete_hint(path, manifest)
    )


def find_damaged(reader: StoreReader, indices: Iterable[int] | None = None) -> list[int]:
    """The written samples (of `indices`, default all) whose arrays do not read back intact,
    or whose rows of a per-sample table (split, class fractions, ...) are lost."""
    lost = _table_damage(reader, scores=False)  # a resume rewrites samples, not scores
    in_tables = set(np.concatenate(list(lost.values())).tolist()) if lost else set()
    return _unreadable_samples(reader, indices, in_tables)


def _unreadable_samples(
    reader: StoreReader,
    indices: Iterable[int] | None = None,
    known: AbstractSet[int] = frozenset(),
    progress: Progress | None = None,
) -> list[int]:
    """The written samples (of `indices`, default all) in `known`, or whose arrays do not read
    back intact; each read told to `progress` as "reading samples"."""
    written = reader.written()
    chosen = range(len(written)) if indices is None else indices
    todo = [int(i) for i in chosen if i < len(written) and written[i]]
    damaged = []
    for done, index in enumerate(todo, start=1):
        if index in known or not _reads_back(reader, index):
            damaged.append(index)
        if progress is not None:
            progress("reading samples", done, len(todo))
    return damaged


def _reads_back(reader: StoreReader, index: int) -> bool:
    try:
        reader.read(index)
    except InputDataError:
        return False
    return True


def _table_damage(reader: StoreReader, scores: bool = True) -> dict[str, np.ndarray]:
    """Zarr stores: the written samples each damaged per-sample table lost, the quality scores'
    too if `scores` (GeoTIFF stores keep those facts in sample records, which load whole or fail)."""
    if not isinstance(reader, ZarrReader):
        return {}
    return reader.damaged_tables(scores)


def _tables_damaged(reader: StoreReader, tables: dict[str, np.ndarray]) -> InputDataError:
    """One line naming every damaged table; a table of samples first (its writer's --resume
    mends it; the scores' hint only where they alone are damaged)."""
    # By name, not by the group's listing, whose order the file system chooses.
    names = sorted(tables, key=lambda name: (name == QUALITY_ARRAY, name))
    error = table_damaged(names[0], tables[names[0]], reader.root, _table_hint(reader, names[0]))
    also = [f"{name!r} ({shown_samples(tables[name])})" for name in names[1:]]
    if also:
        error.message += f"; also the tables {', '.join(also)}"
    return error


def _table_hint(reader: StoreReader, name: str) -> str:
    """Samples are rewritten by their writer's --resume; scores by scoring the store again."""
    if name == QUALITY_ARRAY:
        return "rerun `specdm benchmark --write-scores` on it"
    return repair_hint(reader.manifest)


def forget_damaged(path: Path, indices: Iterable[int] | None = None) -> list[int]:
    """Clear the written flags of damaged samples so a resume rewrites them; a complete store
    becomes incomplete first. Returns the damaged indices (one note on stderr if any)."""
    manifest = load_manifest(path / MANIFEST_NAME)
    reader: ZarrReader | GeoTiffReader = (
        ZarrReader(path, manifest) if manifest.format == "zarr" else GeoTiffReader(path, manifest)
    )
    if isinstance(reader, ZarrReader):
        lost = reader.lost_written().tolist()
        if lost:  # read as unwritten once the store is incomplete: the resume writes them
            reader = ZarrReader(path, manifest.model_copy(update={"complete": False}))
    else:
        lost = reader.damaged_markers  # left out of its records: read as unwritten already
    damaged = sorted({*find_damaged(reader, indices), *lost})
    if damaged:
        writer = (
            ZarrWriter(path, manifest)
            if manifest.format == "zarr"
            else GeoTiffWriter(path, manifest)
        )
        if manifest.complete:
            # Incomplete again: a GeoTIFF store's readers then go by its markers, not `files`.
            writer.save_manifest(manifest.model_copy(update={"complete": False, "files": None}))
        writer.forget(damaged)
        shown = ", ".join(map(str, damaged[:5])) + (", ..." if len(damaged) > 5 else "")
        log.warning("note: rewriting %d damaged samples (%s) (%s)", len(damaged), shown, path)
    return damaged


def open_writer(path: Path, manifest: Manifest) -> StoreWriter:
    """A writer over an existing store laid out by `create_store`."""
    if manifest.format == "zarr":
        return ZarrWriter(path, manifest)
    return GeoTiffWriter(path, manifest)


def create_store(path: Path, manifest: Manifest, capacity: int, georeferenced: bool) -> None:
    """Lay out an empty store in a temporary sibling, then rename it into place atomically."""
    remove_abandoned_creations(path)
    temp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    remove_tree(temp)
    temp.mkdir(parents=True)
    # Held until the rename: a later run removes the folder only once its creator is dead.
    handle = os.open(temp, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if manifest.format == "zarr":
            create_zarr(temp, manifest, capacity, georeferenced)
        else:
            create_geotiff(temp, manifest)
        fault_point("store.before_rename")
        temp.rename(path)
    except BaseException:
        remove_tree(temp)
        raise
    finally:
        os.close(handle)


def is_ours(path: Path, kind: OutputKind) -> bool:
    """May `--overwrite` remove `path`? True for an empty folder or one that specdm made as
    `kind` (a store's manifest.json or a run's run.json validates); a folder a live process
    holds locked raises LockHeldError (exit 6): it is in use, not ours to remove.
    """
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    refuse_if_locked(path)
    if kind == "run":
        return (path / "run.json").is_file() and _is_run_json(path / "run.json")
    try:
        load_manifest(path / MANIFEST_NAME)
    except InputDataError:
        return False
    return True


def remove_own(path: Path, kind: OutputKind, stage: object = None) -> None:
    """`--overwrite`: remove `path` if specdm made it as `kind` (DESIGN.md), and a store only if
    the `stage` overwriting it made it (where given): `synthesize --overwrite` onto a prepared
    store would delete real data. Else refuse."""
    refuse_overwrite_of_others(path, kind, stage)
    # Under its writer lock, so no reader starts between the check for readers and the removal;
    # renamed aside first, so no one sees a store half removed (its lock file gone, so unlocked,
    # its manifest gone, so "not a specdm store"): the name holds the whole store or nothing.
    aside = path.with_name(f".{path.name}.removing-{os.getpid()}")
    with DirLock(path) as lock:
        refuse_if_locked(path, mine=lock.path)
        remove_tree(aside)
        path.rename(aside)
    remove_tree(aside)
    fault_point("store.after_remove")  # the name is free: the new store is not made yet


def refuse_overwrite_of_others(path: Path, kind: OutputKind, stage: object = None) -> None:
    """`--overwrite` of `path` (which exists) is refused unless specdm made it as `kind`, by
    `stage` where given (see `remove_own`): checked before a command reads its inputs."""
    if not is_ours(path, kind):
        raise InputDataError(
            f"refusing to overwrite a folder that is not a specdm {kind}",
            path,
            "remove it yourself or choose another output",
        )
    made_by = _made_by(path) if kind == "store" else None
    if stage is not None and made_by not in (None, stage):
        raise InputDataError(
            f"refusing to overwrite a store `specdm {made_by}` made with `specdm {stage}`",
            path,
            "choose another output (remove it yourself if it is no longer needed)",
        )


def _made_by(store: Path) -> object:
    """The stage that made the store (its plan's), None for one that records none or for an
    empty folder."""
    if not (store / MANIFEST_NAME).is_file():
        return None
    return (load_manifest(store / MANIFEST_NAME).plan or {}).get("stage")


def _is_run_json(path: Path) -> bool:
    """A run.json specdm wrote: `"specdm_run": true` beside a run's own fields, not any JSON."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("specdm_run") is True
        and {"run_id", "task", "stages", "source_manifest_sha256"} <= record.keys()
    )


def stored_sample_bytes(task: Task, bands: int, dtype: str, height: int, width: int) -> int:
    """Bytes one sample's arrays take uncompressed: its images in `dtype`, its uint8 label.

    Planning uses it uncompressed: Blosc-zstd saves only about 10% on reflectance (the demo
    store: 157 of 176 MB).
    """
    images = len(array_names(task)) - 1
    return height * width * (images * bands * np.dtype(dtype).itemsize + 1)


def default_store_path(stem: str, store_format: StoreFormat) -> Path:
    """`demo.zarr` for a Zarr store, `demo` for a folder of GeoTIFF tiles (not a Zarr store)."""
    return Path(f"{stem}.zarr") if store_format == "zarr" else Path(stem)


def refuse_stream_out(path: Path, option: str = "--out") -> None:
    """`--out -` would make a folder named `-`: outputs are folders, never stdout (exit 2)."""
    if str(path) == "-":
        raise UsageError(
            f"{option} - is not supported: specdm writes a folder, not a stream",
            hint=f"name a folder, e.g. {option} demo.zarr (use --json for a summary on stdout)",
        )


def resolve_target(
    path: Path, plan: dict[str, object], resume: bool, overwrite: bool, resumable: bool = True
) -> TargetState:
    """Decide what to do with an output path, per DESIGN.md's resume/overwrite rules.

    Returns "fresh" (nothing there, or removed by --overwrite), "resume" (an incomplete store
    of the same plan) or "done" (a complete store of the same plan, with --resume).
    """
    refuse_stream_out(path)
    refuse_resume_with_overwrite(resume, overwrite)
    if not path.exists():
        return "fresh"
    if overwrite:
        remove_own(path, "store", plan.get("stage"))
        return "fresh"
    if not resume:
        raise InputDataError(
            "output already exists",
            path,
            "pass --resume, --overwrite or another --out"
            if resumable
            else "pass --overwrite or another --out",
        )
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return "fresh"
    manifest = load_manifest(path / MANIFEST_NAME)
    if manifest.plan != plan:
        changed = "; ".join(plan_differences(manifest.plan, plan)[:4])
        raise InputDataError(
            f"cannot resume: the store was made with other inputs or options ({changed})",
            path,
            "use the original command, or --overwrite",
        )
    if manifest.complete and forget_damaged(path):
        return "resume"  # complete on paper only: its damaged samples are written again
    return "done" if manifest.complete else "resume"


def check_layout(reader: StoreReader) -> None:
    """Arrays (Zarr) or tiles (GeoTIFF) agree with the manifest; else the store is damaged."""
    manifest = reader.manifest
    if isinstance(reader, ZarrReader):
        for name, (shape, dtype) in _expected_arrays(manifest).items():
            array = _array(reader.group, name)
            if array.shape != shape:
                raise InputDataError(
                    f"array {name} has shape {array.shape}, manifest says {manifest.count} samples "
                    f"of {shape[1:]}",
                    reader.root,
                    "re-create the store",
                )
            if array.dtype != dtype:
                raise InputDataError(
                    f"array {name} holds {array.dtype}, manifest says {dtype}",
                    reader.root,
                    "re-create the store",
                )
    elif isinstance(reader, GeoTiffReader):
        root = reader.root.resolve()
        for record in reader.records:
            for relative in record.files.values():
                tile = (root / relative).resolve()
                if not tile.is_relative_to(root):
                    raise InputDataError(
                        "manifest points outside the store", tile, "re-create the store"
                    )
                if not tile.is_file():
                    raise InputDataError(
                        "tile listed in the manifest is missing", tile, "re-create the store"
                    )


def _expected_arrays(manifest: Manifest) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each raster array's shape and dtype as the manifest describes them."""
    pixels = (manifest.height, manifest.width)
    image = ((manifest.count, len(manifest.bands), *pixels), np.dtype(manifest.dtype))
    label = ((manifest.count, *pixels), np.dtype("uint8"))
    return {**dict.fromkeys(IMAGE_ARRAYS[manifest.task], image), LABEL_ARRAY[manifest.task]: label}


def verify_store(reader: StoreReader, progress: Progress | None = None) -> str:
    """`inspect --verify`: read every per-sample table and written sample (told to `progress`);
    damage is an input error naming the table or the samples (exit 3)."""
    fault_point("inspect.verify")
    tables = _table_damage(reader)
    if tables:
        raise _tables_damaged(reader, tables)
    damaged = _unreadable_samples(reader, progress=progress)  # tables were read whole above
    if damaged:
        raise InputDataError(
            f"{len(damaged)} damaged samples (missing or corrupt chunks): "
            f"{shown_samples(np.array(damaged))}",
            reader.root,
            repair_hint(reader.manifest),
        )
    if isinstance(reader, ZarrReader):
        unchecked = not reader.has_checksums
    else:
        unchecked = isinstance(reader, GeoTiffReader) and any(
            r.crc32 is None for r in reader.records
        )
    if unchecked:
        return "readable (store has no checksums: written before they existed)"
    return "all samples match their checksums"


def store_sha256(root: Path) -> str:
    """sha256 of a store's `manifest.json`: what identifies the data a run or report used."""
    return file_sha256(root / MANIFEST_NAME)


def content_sha256(reader: StoreReader) -> str | None:
    """sha256 of a store's samples (their checksums) and splits: equal for two stores of the
    same data, which `store_sha256` is not (a manifest records when it was made). None for a
    store written before checksums existed."""
    sums = reader.sample_checksums()
    if sums is None:
        return None
    digest = hashlib.sha256(np.ascontiguousarray(sums, dtype="<u4").tobytes())
    digest.update("\n".join(map(str, reader.splits())).encode())
    return digest.hexdigest()


def plan_differences(old: dict[str, object], new: dict[str, object], prefix: str = "") -> list[str]:
    """What differs between a stored plan and this run's, one `--option: store X, now Y` each."""
    found = []
    for key in sorted(set(old) | set(new)):
        before, now = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(now, dict):
            found += plan_differences(before, now)
        elif before != now:
            flag = PREPARE_FLAGS.get(key, (f"--{key.replace('_', '-')}",))[0]
            name = _PLAN_NAMES.get(key, flag)
            found.append(f"{name}: store {_shown(before)}, now {_shown(now)}")
    return found


# Plan keys that are not spelled as their option.
_PLAN_NAMES = {
    "raw": "RAW",
    "source": "SOURCE",
    "stage": "command",
    "model_sha256": "--model",
    "masks_sha256": "--masks (its manifest)",
}


def _shown(value: object) -> str:
    return "unset" if value is None else json.dumps(value)
