"""Opening a store of either format for reading or writing, and laying out a new one."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from specdm_cli.errors import InputDataError, missing_store
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_abandoned_creations, remove_tree
from specdm_cli.manifest import Manifest, load_manifest
from specdm_cli.stores.base import MANIFEST_NAME, StoreReader, StoreWriter
from specdm_cli.stores.geotiff_store import GeoTiffReader, GeoTiffWriter, create_geotiff
from specdm_cli.stores.hints import incomplete_hint
from specdm_cli.stores.ownership import is_run_json
from specdm_cli.stores.zarr_store import ZarrReader, ZarrWriter, create_zarr


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
    if not (path / MANIFEST_NAME).exists() and is_run_json(path / "run.json"):
        raise _run_for_a_store(path)
    manifest = load_manifest(path / MANIFEST_NAME)
    if not manifest.complete and not allow_incomplete:
        raise incomplete_store(path, manifest)
    if manifest.format == "zarr":
        return ZarrReader(path, manifest)
    return GeoTiffReader(path, manifest)


def _run_for_a_store(run: Path) -> InputDataError:
    """A run folder where a store was asked for: the store it names is what was meant."""
    source = json.loads((run / "run.json").read_text(encoding="utf-8")).get("source_store")
    return InputDataError(
        "not a specdm store: a run folder (run.json), no manifest.json",
        run,
        f"pass the store it was trained on (its run.json names {source})"
        if source
        else "pass a store `specdm prepare` made",
    )


def manifest_in(folder: Path) -> Manifest | None:
    """The manifest of the specdm store `folder` is; None where it has none or another's (an
    unreadable one is for the caller to judge)."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        return load_manifest(folder / MANIFEST_NAME)
    except InputDataError:
        return None


def incomplete_store(path: Path, manifest: Manifest) -> InputDataError:
    """A store its writer left incomplete, with the command that completes it."""
    return InputDataError(
        "store is incomplete (its writer stopped early)", path, incomplete_hint(path, manifest)
    )


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
