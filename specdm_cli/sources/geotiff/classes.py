"""Classes of a GeoTIFF folder: a classes file, a specdm export's manifest, or the masks."""

from __future__ import annotations

import colorsys
import csv
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.faults import fault_point
from specdm_cli.manifest import (
    IGNORE_INDEX,
    LABEL_ARRAY,
    ClassInfo,
    Manifest,
    Task,
    load_manifest,
)
from specdm_cli.sources.base import (
    NODATA_CODE,
    PrepareOptions,
    integral,
    label_values,
    read_text_input,
    refuse_class_nodata,
    require_integer_labels,
)
from specdm_cli.sources.geotiff.categories import category_names
from specdm_cli.sources.geotiff.headers import open_raster
from specdm_cli.sources.geotiff.layout import Files

# Pixels per read when scanning mask codes: memory stays flat however large a mask claims to be.
_SCAN_PIXELS = 1 << 22


@dataclass(frozen=True)
class ResolvedClasses:
    """A folder's classes, where they came from, notes for the user, and the codes a classes
    file declares (empty otherwise): a mask's nodata tag naming one of those is read as it."""

    classes: list[ClassInfo]
    source: str
    notes: list[str] = field(default_factory=list)
    declared: frozenset[int] = frozenset()


def resolve_classes(
    root: Path,
    options: PrepareOptions,
    task: Task,
    files: Files,
    colour_masks: bool = False,
    exported: Manifest | None = None,
    progress: Progress | None = None,
) -> ResolvedClasses:
    """Classes from the given file, RAW/classes.{json,csv}, a specdm manifest, or the masks.

    Colour masks (RGB labels) need the file, with a distinct colour for every class: the
    colour is what a mask pixel holds. A file's codes are checked against every mask here
    (each mask's pixels read once more, reported to `progress` as "scanning masks"), before
    any sample is written."""
    path = classes_path(root, options)
    if colour_masks:
        return ResolvedClasses(_colour_classes(path, root), str(path))
    masks = [paths[LABEL_ARRAY[task]] for paths in files.values()]
    if path is not None:
        classes = _read_classes_file(path)
        named = {int(str(c.code)): c.name for c in classes}
        refuse_class_nodata(options.label_nodata, named, path.name)
        declared = frozenset(named)
        notes = _check_declared_codes(masks, declared, options.label_nodata, path, progress)
        return ResolvedClasses(classes, str(path), notes, declared)
    if exported is not None:  # a specdm export's masks hold class indices as codes
        indexed = [c.model_copy(update={"code": c.index}) for c in exported.classes]
        return ResolvedClasses(indexed, str(root / "manifest.json"))
    scans = [scan for _, scan in _scan_masks(masks, options.label_nodata, (), progress)]
    found = set().union(*(scan.codes for scan in scans))
    codes, notes = _discovered_codes(found, task)
    if not codes:
        raise InputDataError(
            "the label files hold no class codes (all nodata/255)", root, "check the masks"
        )
    # The masks' own colour table and class names, where they carry them, so a GeoTIFF export
    # keeps their colours and reports name the classes as the product does.
    palette = next((scan.palette for scan in scans if scan.palette), {})
    names = next((scan.names for scan in scans if scan.names), {})
    fallback = _change_names(codes) if task == "cd" else {}
    rows = [
        (code, names.get(code) or fallback.get(code, f"class_{code}"), palette.get(code))
        for code in codes
    ]
    return ResolvedClasses(_make_classes(rows, root), "masks", [*notes, *_sentinel_notes(scans)])


def _change_names(codes: list[int]) -> dict[int, str]:
    """A change mask's two codes (0/1, 0/255) named as OSCD's classes are, lower first."""
    return dict(zip(codes, ("no change", "change"), strict=True)) if len(codes) == 2 else {}


def classes_path(root: Path, options: PrepareOptions) -> Path | None:
    """The classes file: --classes, else RAW/classes.json or RAW/classes.csv, else None."""
    if options.classes_file is not None:
        return options.classes_file
    return next((p for p in (root / "classes.json", root / "classes.csv") if p.is_file()), None)


def grey_rgb_notes(masks: list[Path], path: Path | None) -> list[str] | None:
    """A note when RGB masks hold grey levels only (R = G = B, as image editors save a grey
    mask): they are then read as class codes, not colours. None when they are colour masks:
    a pixel is not grey, or a classes file gives every class a colour (grey ones included)."""
    if not masks:
        return None
    if path is not None and all(colour for _, _, colour in _read_class_rows(path)):
        return None
    if not all(_all_grey(mask) for mask in masks):
        return None
    return [
        f"note: {len(masks)} RGB mask(s) hold only grey levels (R = G = B, e.g. "
        f"{masks[0].name}): read as class codes, not colours"
    ]


def _all_grey(path: Path) -> bool:
    """Whether every opaque pixel of an RGB mask has R = G = B (read window by window)."""
    with open_raster(path) as src:
        alpha = ColorInterp.alpha in src.colorinterp
        bands = [i + 1 for i, kind in enumerate(src.colorinterp) if kind != ColorInterp.alpha]
        for window in _scan_windows(src.height, src.width):
            rgb = src.read(bands, window=window)
            grey = (rgb[0] == rgb[1]) & (rgb[1] == rgb[2])
            if alpha:
                grey |= src.read_masks(1, window=window) == 0
            if not grey.all():
                return False
    return True


def _discovered_codes(found: set[int], task: Task) -> tuple[list[int], list[str]]:
    """The class codes of masks with no classes file: 255 means ignore, except in change masks
    that hold one other code, as LEVIR-CD's, WHU-CD's and OSCD's do (0 no change, 255 change):
    there a store without 255 would have no change at all."""
    codes = sorted(found - {IGNORE_INDEX})
    if IGNORE_INDEX not in found or len(codes) != 1:
        return codes, []
    if task == "ss":
        warning = (
            f"warning: the masks hold one class code ({codes[0]}) and 255, read as no label; "
            f"if 255 is a class (0/255 building masks), declare both in a classes file: "
            f"--classes FILE.csv with rows code,name / {codes[0]},background / 255,building"
        )
        return codes, [warning]
    note = (
        f"note: the change masks hold only {codes[0]} and 255: read 255 as change (a class); "
        "if 255 means no data, pass --label-nodata 255"
    )
    return [codes[0], IGNORE_INDEX], [note]


def label_nodata_of(
    option: float | None, tag: float | None, declared: Collection[int]
) -> float | None:
    """A mask's nodata value: --label-nodata, else its tag, unless a classes file declares the
    tagged code a class (a class list written for the data wins over a tag a tool set)."""
    if option is not None:
        return option
    return None if integral(tag) in declared else tag


def _check_declared_codes(
    masks: list[Path],
    declared: frozenset[int],
    option: float | None,
    source: Path,
    progress: Progress | None = None,
) -> list[str]:
    """Every mask's codes must be declared (exit 3 naming the mask; found while writing, it
    left a half-written store); a tag that names a declared code is read as the class (noted)."""
    overridden: set[int] = set()
    for path, scan in _scan_masks(masks, option, declared, progress):
        tagged = integral(scan.tag)
        if option is None and tagged is not None and tagged in declared:
            overridden.add(tagged)
        unknown = sorted(scan.codes - declared - {IGNORE_INDEX})  # 255 undeclared: ignore
        if unknown:
            raise InputDataError(
                f"label code(s) {unknown[:5]} not in {source.name} (its codes: {sorted(declared)})",
                path,
                f"add them to {source.name}, or pass --label-nodata CODE if one means no data",
            )
    return [
        f"note: masks tag {code} as nodata, but {source.name} declares code {code} a class: "
        "read as the class"
        for code in sorted(overridden)
    ]


def _sentinel_notes(scans: list[_MaskScan]) -> list[str]:
    """A discovered code that is its mask's data type's largest value is usually a nodata fill."""
    largest = {
        int(np.iinfo(scan.dtype).max): scan.dtype.name
        for scan in scans
        if scan.dtype.kind in "ui" and int(np.iinfo(scan.dtype).max) in scan.codes - {IGNORE_INDEX}
    }
    return [
        f"note: label code {code} (the largest {name}) became a class; "
        f"if it means no data, pass --label-nodata {code}"
        for code, name in sorted(largest.items())
    ]


def exported_manifest(root: Path, task: Task) -> Manifest | None:
    """The manifest of a specdm GeoTIFF export of `task` in RAW, or None."""
    if not (root / "manifest.json").is_file():
        return None
    try:
        manifest = load_manifest(root / "manifest.json")
    except InputDataError:
        return None  # someone else's manifest.json: not ours to interpret
    if manifest.format != "geotiff" or manifest.task != task:
        return None
    return manifest


ClassRow = tuple[int, str, tuple[int, int, int] | None]


def _colour_classes(path: Path | None, root: Path) -> list[ClassInfo]:
    if path is None:
        raise InputDataError(
            "RGB label files hold class colours, and no classes file says which class each is",
            root,
            f"write a classes file with columns code,name,colour (#rrggbb), one row per mask "
            f"colour, as {root / 'classes.csv'} or passed as --classes FILE",
        )
    rows = _read_class_rows(path)
    uncoloured = [code for code, _, colour in rows if colour is None]
    colours = [colour for _, _, colour in rows]
    if uncoloured or len(set(colours)) != len(colours):
        what = f"no colour for code(s) {uncoloured[:5]}" if uncoloured else "a colour listed twice"
        raise InputDataError(
            f"classes file for RGB label files: {what}",
            path,
            "give each class the distinct colour its pixels have in the masks",
        )
    return _make_classes(rows, path)


def colour_lookup(classes: list[ClassInfo]) -> dict[int, int]:
    """Packed 0xRRGGBB colour -> class code."""
    return {(r << 16) | (g << 8) | b: int(str(c.code)) for c in classes for r, g, b in [c.colour]}


def codes_from_colours(
    rgb: np.ndarray, lookup: dict[int, int], path: Path, skip: np.ndarray | None = None
) -> np.ndarray:
    """(3, H, W) colours -> (H, W) class codes; a colour no class has is an error naming it.
    Pixels in `skip` (transparent) are not looked up: their code is any class's."""
    packed = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2]
    if skip is not None:
        packed[skip] = next(iter(lookup))
    present, position = np.unique(packed, return_inverse=True)
    unknown = [int(v) for v in present if int(v) not in lookup]
    if unknown:
        shown = ", ".join(f"#{v:06x}" for v in unknown[:5])
        raise InputDataError(
            f"mask colour(s) {shown} belong to no class of the classes file",
            path,
            "add them to --classes, or repaint those pixels",
        )
    codes = np.array([lookup[int(v)] for v in present], dtype=np.int64)
    return codes[position.reshape(packed.shape)]


def _read_classes_file(path: Path) -> list[ClassInfo]:
    return _make_classes(_read_class_rows(path), path)


def _read_class_rows(path: Path) -> list[ClassRow]:
    if not path.is_file():
        raise InputDataError("classes file not found", path, "check the --classes path")
    text = read_text_input(path)
    try:
        rows = _classes_csv(text) if path.suffix.lower() == ".csv" else _classes_json(text)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputDataError(
            f"bad classes file ({exc})",
            path,
            'use {"classes": [{"code": 10, "name": "water", "colour": [0, 0, 255]}]} '
            "or CSV columns code,name[,colour]",
        ) from None
    return rows


def _classes_json(text: str) -> list[ClassRow]:
    data = json.loads(text)
    entries = data["classes"] if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError("expected a list of classes")
    return [
        (_code(e["code"]), str(e.get("name") or f"class_{e['code']}"), _colour(e)) for e in entries
    ]


def _classes_csv(text: str) -> list[ClassRow]:
    rows = list(csv.DictReader(text.splitlines()))
    columns = {c.strip().lower() for c in (rows[0].keys() if rows else [])}
    if not {"code", "name"} <= columns:
        raise ValueError(f"columns code and name needed, found {sorted(columns)}")
    lowered = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in rows]
    return [(_code(r["code"]), r["name"] or f"class_{r['code']}", _colour(r)) for r in lowered]


def _code(value: Any) -> int:
    code = int(value)
    # Codes may exceed 254 (CORINE's are 111..523), and 255 declared is a class (0/255 masks);
    # undeclared, 255 means ignore.
    if str(value).strip() not in (str(code), f"{code}.0") or code < 0:
        raise ValueError(f"code {value!r} is not an integer >= 0")
    return code


def _colour(entry: dict[str, Any]) -> tuple[int, int, int] | None:
    value = entry.get("colour", entry.get("color"))
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = value.strip().lstrip("#")
        value = [int(value[i : i + 2], 16) for i in (0, 2, 4)] if len(value) == 6 else value
    if not isinstance(value, list) or len(value) != 3 or not all(0 <= int(v) <= 255 for v in value):
        raise ValueError(
            f"colour {entry.get('colour', entry.get('color'))!r} is not #rrggbb or [r, g, b]"
        )
    return int(value[0]), int(value[1]), int(value[2])


def _make_classes(rows: list[ClassRow], path: Path) -> list[ClassInfo]:
    """ClassInfo in code order: index i is the i-th smallest code (remap_labels' order)."""
    codes = [code for code, _, _ in rows]
    if not rows or len(set(codes)) != len(codes):
        what = "no classes" if not rows else "a code listed twice"
        raise InputDataError(f"bad classes: {what}", path, "list each class code once")
    if len(rows) > IGNORE_INDEX:
        raise InputDataError(f"{len(rows)} classes, at most 255", path, "merge classes")
    return [
        ClassInfo(index=i, name=name, colour=colour or _default_colour(i), code=code)
        for i, (code, name, colour) in enumerate(sorted(rows))
    ]


def _default_colour(index: int) -> tuple[int, int, int]:
    # Golden-ratio hues: neighbouring classes get clearly different colours, any class count.
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.65, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class _MaskScan:
    codes: set[int]  # distinct codes, nodata excluded
    tag: float | None  # the file's nodata tag
    dtype: np.dtype[Any]
    palette: dict[int, tuple[int, int, int]] | None = None  # the file's colour table, if any
    names: dict[int, str] = field(default_factory=dict)  # the file's class names, if any


def _scan_masks(
    masks: list[Path],
    label_nodata: float | None,
    declared: Collection[int],
    progress: Progress | None,
) -> Iterator[tuple[Path, _MaskScan]]:
    """Each mask with its scan, in turn, reported to `progress` as "scanning masks"."""
    for done, path in enumerate(masks, start=1):
        yield path, _scan_mask(path, label_nodata, declared)
        if progress is not None:
            progress("scanning masks", done, len(masks))


def _scan_mask(path: Path, label_nodata: float | None, declared: Collection[int] = ()) -> _MaskScan:
    """One mask's codes, read window by window (memory stays flat), its tag and data type."""
    codes: set[int] = set()
    with open_raster(path) as src:
        nodata = label_nodata_of(label_nodata, src.nodata, declared)
        alpha = ColorInterp.alpha in src.colorinterp
        for window in _scan_windows(src.height, src.width):
            fault_point("geotiff.scan_block")
            # Distinct raw values first (cheap in the file's own dtype), then nodata -> 255.
            raw = src.read(1, window=window)
            if alpha:  # transparent pixels are unlabelled, whatever value they hold
                raw = raw[src.read_masks(1, window=window) != 0]
            values = label_values(np.unique(raw), nodata)
            require_integer_labels(values, path)
            codes |= {int(v) for v in values if v != NODATA_CODE}
        tag, dtype, palette = src.nodata, np.dtype(src.dtypes[0]), _palette(src)
        names = category_names(src, path)
    if codes and min(codes) < 0:
        raise InputDataError(
            f"negative label code {min(codes)}",
            path,
            f"if {min(codes)} means no data, pass --label-nodata {min(codes)}; else fix the file",
        )
    return _MaskScan(codes, tag, dtype, palette, names)


def _palette(src: Any) -> dict[int, tuple[int, int, int]] | None:
    """A paletted mask's colours by code (land-cover products ship them), else None."""
    try:
        table = src.colormap(1)
    except ValueError:  # rasterio: "NULL color table"
        return None
    return {int(code): (r, g, b) for code, (r, g, b, _alpha) in table.items()}


def _scan_windows(height: int, width: int) -> Iterator[Window]:
    columns = min(width, _SCAN_PIXELS)
    rows = max(1, _SCAN_PIXELS // columns)
    for row in range(0, height, rows):
        for column in range(0, width, columns):
            yield Window(column, row, min(columns, width - column), min(rows, height - row))
