"""`specdm inspect`: validate a store against its manifest and summarise it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import Manifest, array_names
from specdm_cli.stores import StoreReader, find_damaged, open_store
from specdm_cli.stores.geotiff_store import GeoTiffReader
from specdm_cli.stores.zarr_store import REPAIR_HINT, ZarrReader, _array


def inspect_store(
    path: Path, allow_incomplete: bool = False, verify: bool = False
) -> dict[str, Any]:
    """Validate the store at `path` and return its summary (the `--json` payload); `verify`
    reads every written sample back against its checksums."""
    reader = open_store(path, allow_incomplete)
    _validate_layout(reader)
    manifest = reader.manifest
    written = reader.written()
    if manifest.complete and not written.all():
        missing = np.flatnonzero(~written)[:5].tolist()
        raise InputDataError(
            f"store claims complete but samples {missing} are not written", path, "re-create it"
        )
    summary = _summary(path, manifest, int(written.sum()))
    if verify:
        summary["verified"] = _verify(reader)
    return summary


def _verify(reader: StoreReader) -> str:
    """Read every written sample; damaged ones are an input error naming them (exit 3)."""
    damaged = find_damaged(reader)
    if damaged:
        shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
        raise InputDataError(
            f"{len(damaged)} damaged samples (missing or corrupt chunks): {shown}",
            reader.root,
            REPAIR_HINT,
        )
    if isinstance(reader, ZarrReader) and not reader.has_checksums:
        return "readable (store has no checksums: written before they existed)"
    return "all samples match their checksums"


def _validate_layout(reader: StoreReader) -> None:
    manifest = reader.manifest
    if isinstance(reader, ZarrReader):
        for name in array_names(manifest.task):
            array = _array(reader.group, name)
            expected_tail = (manifest.height, manifest.width)
            if array.shape[0] != manifest.count or tuple(array.shape[-2:]) != expected_tail:
                raise InputDataError(
                    f"array {name} has shape {array.shape}, manifest says {manifest.count} samples "
                    f"of {expected_tail}",
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


def _summary(path: Path, manifest: Manifest, written: int) -> dict[str, Any]:
    fractions = manifest.class_pixel_fraction.get("all", [])
    return {
        "path": str(path),
        "format": manifest.format,
        "task": manifest.task,
        "complete": manifest.complete,
        "count": manifest.count,
        "written": written,
        "shape": {"bands": len(manifest.bands), "height": manifest.height, "width": manifest.width},
        "dtype": manifest.dtype,
        "split_counts": manifest.split_counts,
        "bands": [b.model_dump() for b in manifest.bands],
        "classes": [
            {
                **c.model_dump(),
                "pixel_fraction": fractions[c.index] if c.index < len(fractions) else None,
            }
            for c in manifest.classes
        ],
        "crs": manifest.crs,
        "source": manifest.source.model_dump() if manifest.source else None,
        "model": manifest.model.model_dump() if manifest.model else None,
        "tool_version": manifest.tool_version,
        "created": manifest.provenance.get("created"),
    }


def render_report(report: dict[str, Any], console: Console) -> None:
    """The human-readable summary of `inspect_store`."""
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
    if "verified" in report:
        console.print(f"verified: {report['verified']}")
