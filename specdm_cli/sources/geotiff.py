"""GeoTIFF-folder reader: a user's own `images/`+`masks/` or `t1/`+`t2/`+`change/` tiles in."""

from __future__ import annotations

import colorsys
import csv
import functools
import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import (
    GEOTIFF_FOLDERS,
    IGNORE_INDEX,
    LABEL_ARRAY,
    Band,
    ClassInfo,
    Task,
    array_names,
    load_manifest,
)
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    apply_nodata,
    pad_image_as_nodata,
    pad_to,
    patch_bounds,
    patch_windows,
    remap_labels,
    require_dir,
)

_EXTENSIONS = (".tif", ".tiff")
_SPLITS = ("train", "val", "test")
_TASKS: tuple[Task, ...] = ("ss", "cd")
# "B04 (664.6 nm)", "664.6 nm", "Band 3: 0.56 um": a number followed by a length unit.
_WAVELENGTH = re.compile(r"\(?\s*(\d+(?:\.\d*)?)\s*(nm|um|µm|micrometers?)\s*\)?", re.IGNORECASE)
_RGB_NM = (664.6, 559.8, 492.7)  # Sentinel-2 B04, B03, B02 centres: the usual true-colour triple
_RGB_TOLERANCE_NM = 40.0
_MASK_ROWS = 1024  # rows per read when scanning mask codes: memory stays flat on huge masks

Files = dict[str, dict[str, Path]]  # stem -> array name -> path


@dataclass(frozen=True)
class _Header:
    """Facts of one file read from its header at open time."""

    path: Path
    count: int
    dtype: str
    height: int
    width: int
    crs: str | None


@dataclass(frozen=True)
class _Context:
    """Everything `load` needs; immutable, so loads in threads share it without a lock."""

    task: Task
    files: Files
    codes: tuple[int, ...]
    height: int
    width: int
    dtype: str
    nodata: float | None
    georeferenced: bool


def read_geotiff(raw: Path | None, options: PrepareOptions) -> SourcePlan:
    """Open a folder of labelled GeoTIFFs: pair files by stem, check headers, plan patches.

    `images/`+`masks/` is task ss, `t1/`+`t2/`+`change/` task cd; other files (e.g. a specdm
    export's `manifest.json`) are ignored. Headers are read here, mask pixels only to discover
    classes. Samples are patch_size (capped at the largest file), smaller files padded.

    Args:
        raw: the folder holding the array folders.
        options: classes_file, splits_file, val/test fractions, seed, patch_size, overlap, nodata.

    Returns:
        The plan; its `load` is thread-safe and reads one window per file, so memory stays flat.

    Raises:
        InputDataError: bad layout, files, bands, sizes, CRS, classes or splits file.
        UsageError: val/test fractions out of range.
    """
    # Ungeoreferenced files are valid input (spec.crs None says so); rasterio warns on each open.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    root = require_dir(raw, "geotiff")
    task = _infer_task(root)
    files = _pair_files(root, task)
    headers = {stem: _check_stem(paths, task) for stem, paths in files.items()}
    first = next(iter(headers.values()))
    crs = _check_all(headers)
    classes, classes_from = _resolve_classes(root, options, task, files)
    splits, splits_from = _assign_splits(list(files), options)
    height = min(options.patch_size, max(h.height for h in headers.values()))
    width = min(options.patch_size, max(h.width for h in headers.values()))
    candidates = _candidates(headers, splits, height, width, options)
    bands = _read_bands(first.path, first.count)
    spec = SourceSpec(
        dataset="geotiff",
        task=task,
        bands=bands,
        classes=classes,
        dtype=_output_dtype(first.dtype, first.path),
        height=height,
        width=width,
        crs=crs,
        rgb_bands=_rgb_bands(bands),
        details={
            "layout": "+".join(GEOTIFF_FOLDERS[name] for name in array_names(task)),
            "files": len(files),
            "classes_from": classes_from,
            "splits_from": splits_from,
            "label_codes": {str(c.code): c.index for c in classes},
        },
    )
    codes = tuple(int(str(c.code)) for c in classes)
    context = _Context(task, files, codes, height, width, spec.dtype, options.nodata, bool(crs))
    return SourcePlan(spec=spec, candidates=candidates, load=functools.partial(_load, ctx=context))


# --- layout -------------------------------------------------------------------------------


def _infer_task(root: Path) -> Task:
    present: dict[Task, list[bool]] = {
        task: [(root / GEOTIFF_FOLDERS[n]).is_dir() for n in array_names(task)] for task in _TASKS
    }
    complete = [task for task, found in present.items() if all(found)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise InputDataError(
            "both images/+masks/ and t1/+t2/+change/ are present",
            root,
            "keep one layout per folder (ss or cd)",
        )
    for task, found in present.items():
        if any(found):
            folder = GEOTIFF_FOLDERS[array_names(task)[found.index(False)]]
            raise InputDataError(
                "folder missing", root / folder, f"add {folder}/ beside the others"
            )
    raise InputDataError(
        "no images/+masks/ (segmentation) or t1/+t2/+change/ (change detection) folders",
        root,
        "put the tiles in those folders, paired by file name",
    )


def _list_tiffs(folder: Path) -> dict[str, Path]:
    tiffs: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Hidden names are temp files of an interrupted writer, never data.
        if path.name.startswith(".") or path.suffix.lower() not in _EXTENSIONS:
            continue
        if path.stem in tiffs:
            raise InputDataError(
                f"two files share the stem {path.stem!r}", path, "keep one of them"
            )
        tiffs[path.stem] = path
    if not tiffs:
        raise InputDataError("no .tif/.tiff files in folder", folder, "add the tiles")
    return tiffs


def _pair_files(root: Path, task: Task) -> Files:
    names = array_names(task)
    listed = {name: _list_tiffs(root / GEOTIFF_FOLDERS[name]) for name in names}
    stems = sorted(set().union(*listed.values()))
    for stem in stems:
        have = [n for n in names if stem in listed[n]]
        if len(have) < len(names):
            missing = next(n for n in names if stem not in listed[n])
            raise InputDataError(
                f"{listed[have[0]][stem].name} has no partner in {GEOTIFF_FOLDERS[missing]}/",
                root / GEOTIFF_FOLDERS[missing] / f"{stem}.tif",
                "add the missing file or remove its partners",
            )
    return {stem: {name: listed[name][stem] for name in names} for stem in stems}


# --- headers ------------------------------------------------------------------------------


@contextmanager
def _dataset(path: Path) -> Iterator[Any]:
    """An open rasterio dataset; GDAL failures become one input-data line naming the file."""
    try:
        with rasterio.open(path) as src:
            yield src
    except FileNotFoundError:
        raise InputDataError(
            "file disappeared after listing", path, "restore the file and rerun"
        ) from None
    except (RasterioError, OSError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputDataError(
            f"unreadable or corrupt TIFF ({reason})", path, "re-export or remove the file"
        ) from None


def _header(path: Path) -> _Header:
    with _dataset(path) as src:
        crs = None if src.crs is None else _crs_name(src.crs.to_wkt())
        return _Header(path, src.count, str(src.dtypes[0]), src.height, src.width, crs)


@functools.lru_cache(maxsize=16)
def _crs_name(wkt: str) -> str:
    """EPSG:xxxx when the CRS has a code, else its WKT (cached: a PROJ lookup per file is slow)."""
    epsg = CRS.from_wkt(wkt).to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def _check_stem(paths: dict[str, Path], task: Task) -> _Header:
    """Header of the stem's (first) image after checking its partners agree with it."""
    images = [_header(paths[name]) for name in array_names(task)[:-1]]
    label = _header(paths[LABEL_ARRAY[task]])
    for other in [*images[1:], label]:
        if (other.height, other.width) != (images[0].height, images[0].width):
            raise InputDataError(
                f"size {other.height}x{other.width} differs from its image's "
                f"{images[0].height}x{images[0].width}",
                other.path,
                f"make it match {images[0].path.name}",
            )
    if label.count != 1:
        raise InputDataError(
            f"label file has {label.count} bands, expected 1",
            label.path,
            "save labels as one band of class codes",
        )
    return images[0] if len(images) == 1 else _same_bands(images[0], images[1])


def _same_bands(expected: _Header, found: _Header) -> _Header:
    if found.count != expected.count:
        raise InputDataError(
            f"expected {expected.count} bands, found {found.count}",
            found.path,
            "every image must hold the same bands",
        )
    if found.dtype != expected.dtype:
        raise InputDataError(
            f"expected dtype {expected.dtype}, found {found.dtype}",
            found.path,
            "convert every image to one data type",
        )
    return expected


def _check_all(headers: dict[str, _Header]) -> str | None:
    """The CRS every image shares (None when not georeferenced), after checking bands agree."""
    first = next(iter(headers.values()))
    for header in headers.values():
        _same_bands(first, header)
        if header.crs != first.crs:
            raise InputDataError(
                f"CRS {header.crs or 'none'} differs from {first.path.name}'s {first.crs or 'none'}",
                header.path,
                "reproject every file to one CRS (e.g. gdalwarp -t_srs)",
            )
    return first.crs


def _output_dtype(dtype: str, path: Path) -> str:
    kind = np.dtype(dtype).kind
    if kind not in "uif":
        raise InputDataError(
            f"unsupported image data type {dtype}", path, "convert to an integer or float type"
        )
    # float64 carries no information reflectance needs and doubles the store.
    return "float32" if dtype == "float64" else dtype


# --- bands --------------------------------------------------------------------------------


def _read_bands(path: Path, count: int) -> list[Band]:
    """Band names and wavelengths from the descriptions and tags of `path`."""
    with _dataset(path) as src:
        bands = []
        for index in range(1, count + 1):
            name, wavelength = _parse_description(src.descriptions[index - 1] or "")
            tagged = _band_tag_wavelength(src.tags(index), src.tags(index, ns="IMAGERY"))
            wavelength = wavelength or tagged
            bands.append(Band(name=name or f"band_{index}", wavelength_nm=wavelength))
    names = [b.name for b in bands]
    # Band names are xarray coordinates: make repeats unique rather than lose a band.
    return [
        b.model_copy(update={"name": f"{b.name}_{i + 1}"}) if names.count(b.name) > 1 else b
        for i, b in enumerate(bands)
    ]


def _to_nm(value: float, unit: str) -> float:
    return value if unit.lower() == "nm" else value * 1000.0


def _parse_description(text: str) -> tuple[str, float | None]:
    match = _WAVELENGTH.search(text)
    if match is None:
        return text.strip(), None
    name = (text[: match.start()] + text[match.end() :]).strip(" :-,_()")
    return name, _to_nm(float(match.group(1)), match.group(2))


def _band_tag_wavelength(tags: dict[str, str], imagery: dict[str, str]) -> float | None:
    # GDAL's standard band metadata (RFC 100) first, then a plain `wavelength` tag.
    if "CENTRAL_WAVELENGTH_UM" in imagery:
        return _float_or_none(imagery["CENTRAL_WAVELENGTH_UM"], 1000.0)
    lower = {key.lower(): value for key, value in tags.items()}
    if "wavelength" not in lower:
        return None
    unit = lower.get("wavelength_units", lower.get("units", "nm"))
    scale = 1.0 if unit.strip().lower() in ("nm", "nanometers", "nanometer") else 1000.0
    return _float_or_none(lower["wavelength"], scale)


def _float_or_none(text: str, scale: float) -> float | None:
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _rgb_bands(bands: list[Band]) -> list[str] | None:
    """The bands nearest red, green and blue when the image has all three, for previews."""
    picked = []
    for target in _RGB_NM:
        near = [b for b in bands if b.wavelength_nm is not None]
        best = min(near, key=lambda b: abs(float(b.wavelength_nm or 0) - target), default=None)
        if best is None or abs(float(best.wavelength_nm or 0) - target) > _RGB_TOLERANCE_NM:
            return None
        picked.append(best.name)
    return picked if len(set(picked)) == 3 else None


# --- classes ------------------------------------------------------------------------------


def _resolve_classes(
    root: Path, options: PrepareOptions, task: Task, files: Files
) -> tuple[list[ClassInfo], str]:
    """Classes from the given file, RAW/classes.{json,csv}, a specdm manifest, or the masks."""
    path = options.classes_file
    if path is None:
        path = next((p for p in (root / "classes.json", root / "classes.csv") if p.is_file()), None)
    if path is not None:
        return _read_classes_file(path), str(path)
    exported = _manifest_classes(root, task)
    if exported is not None:
        return exported, str(root / "manifest.json")
    codes = _discover_codes([paths[LABEL_ARRAY[task]] for paths in files.values()], root)
    return _make_classes([(code, f"class_{code}", None) for code in codes], root), "masks"


def _manifest_classes(root: Path, task: Task) -> list[ClassInfo] | None:
    """Classes of a specdm GeoTIFF export read back: its masks hold class indices as codes."""
    if not (root / "manifest.json").is_file():
        return None
    try:
        manifest = load_manifest(root / "manifest.json")
    except InputDataError:
        return None  # someone else's manifest.json: not ours to interpret
    if manifest.format != "geotiff" or manifest.task != task:
        return None
    return [c.model_copy(update={"code": c.index}) for c in manifest.classes]


ClassRow = tuple[int, str, tuple[int, int, int] | None]


def _read_classes_file(path: Path) -> list[ClassInfo]:
    if not path.is_file():
        raise InputDataError("classes file not found", path, "check the --classes path")
    try:
        text = path.read_text(encoding="utf-8")
        rows = _classes_csv(text) if path.suffix.lower() == ".csv" else _classes_json(text)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise InputDataError(
            f"bad classes file ({exc})",
            path,
            'use {"classes": [{"code": 10, "name": "water", "colour": [0, 0, 255]}]} '
            "or CSV columns code,name[,colour]",
        ) from None
    return _make_classes(rows, path)


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
    # Codes may exceed 254 (CORINE's are 111..523); only 255 is taken: it means ignore.
    if str(value).strip() not in (str(code), f"{code}.0") or code < 0 or code == IGNORE_INDEX:
        raise ValueError(f"code {value!r} is not an integer >= 0 other than 255 (ignore)")
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


def _discover_codes(paths: list[Path], root: Path) -> list[int]:
    """Sorted distinct label codes of every mask (nodata and 255 excluded)."""
    codes: set[int] = set()
    for path in paths:
        codes |= _mask_codes(path)
    if not codes:
        raise InputDataError(
            "the label files hold no class codes (all nodata/255)", root, "check the masks"
        )
    return sorted(codes)


def _mask_codes(path: Path) -> set[int]:
    codes: set[int] = set()
    with _dataset(path) as src:
        for row in range(0, src.height, _MASK_ROWS):
            window = Window(0, row, src.width, min(_MASK_ROWS, src.height - row))
            values = np.unique(_label_values(src.read(1, window=window), src.nodata))
            if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
                raise InputDataError("label file holds non-integer values", path, "fix the file")
            codes |= {int(v) for v in values if v != IGNORE_INDEX}
    if codes and min(codes) < 0:
        raise InputDataError(
            f"negative label code {min(codes)}", path, "declare it as the mask's nodata or fix it"
        )
    return codes


def _label_values(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Raw label values with the file's nodata turned into the ignore code."""
    values = raw.astype(np.float64 if raw.dtype.kind == "f" else np.int64)
    if nodata is not None:
        values[np.isnan(values) if math.isnan(nodata) else values == nodata] = IGNORE_INDEX
    return values


# --- splits -------------------------------------------------------------------------------


def _assign_splits(stems: list[str], options: PrepareOptions) -> tuple[dict[str, str], str]:
    """Split per source file (never per patch: overlapping patches would leak across splits)."""
    if options.splits_file is not None:
        return _read_splits_file(options.splits_file, stems), str(options.splits_file)
    val, test = options.val_fraction, options.test_fraction
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise UsageError(
            f"val fraction {val} and test fraction {test} must be >= 0 and sum to < 1",
            hint="e.g. --val-fraction 0.1 --test-fraction 0.1",
        )
    n_test = min(_share(test, len(stems)), max(len(stems) - 1, 0))
    n_val = min(_share(val, len(stems)), max(len(stems) - 1 - n_test, 0))
    order = np.random.default_rng(options.seed).permutation(len(stems))
    split_of = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(stems) - n_test - n_val)
    splits = {stems[int(i)]: split_of[rank] for rank, i in enumerate(order)}
    return splits, f"fractions val={val} test={test} seed={options.seed}"


def _share(fraction: float, count: int) -> int:
    # At least one file for a requested split (a val split of 0 files is no val split).
    return max(1, math.floor(fraction * count + 0.5)) if fraction > 0 else 0


def _read_splits_file(path: Path, stems: list[str]) -> dict[str, str]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputDataError(f"unreadable splits file ({exc})", path, "check the path") from None
    if not rows or not {"stem", "split"} <= {(k or "").strip() for k in rows[0]}:
        raise InputDataError(
            "splits file needs columns stem,split", path, "one row per file: stem,train|val|test"
        )
    known = set(stems)
    splits: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        stem, split = (row["stem"] or "").strip(), (row["split"] or "").strip()
        stem = stem.rsplit(".", 1)[0] if stem.lower().endswith(_EXTENSIONS) else stem
        if split not in _SPLITS:
            raise InputDataError(f"line {line}: split {split!r} is not train, val or test", path)
        if stem not in known:
            raise InputDataError(f"line {line}: no image has the stem {stem!r}", path, "fix it")
        if splits.setdefault(stem, split) != split:
            raise InputDataError(f"line {line}: {stem!r} is listed twice", path, "keep one row")
    missing = [s for s in stems if s not in splits]
    if missing:
        raise InputDataError(
            f"{len(missing)} file(s) have no split, e.g. {missing[0]!r}", path, "add them"
        )
    return splits


# --- candidates and loading ----------------------------------------------------------------


def _candidates(
    headers: dict[str, _Header],
    splits: dict[str, str],
    height: int,
    width: int,
    options: PrepareOptions,
) -> list[Candidate]:
    candidates = []
    for stem, header in headers.items():
        if header.height <= height and header.width <= width:
            # One window, padded by `load` when the file is smaller than the sample size.
            candidates.append(Candidate(stem, splits[stem], (stem, 0, 0)))
            continue
        # A file larger than the sample is larger than patch_size: the sample size is capped there.
        windows = patch_windows(header.height, header.width, options.patch_size, options.overlap)
        candidates += [
            Candidate(f"{stem}/y{y}_x{x}", splits[stem], (stem, y, x)) for y, x in windows
        ]
    return candidates


def _load(candidate: Candidate, *, ctx: _Context) -> RawSample:
    """Read one sample's windows (the datasets are opened here, so loads may run in threads)."""
    stem, y, x = candidate.ref
    paths = ctx.files[stem]
    label_name = LABEL_ARRAY[ctx.task]
    raw_label, label_nodata, _ = _read_window(paths[label_name], y, x, ctx)
    label = remap_labels(_label_values(raw_label[0], label_nodata), ctx.codes, paths[label_name])
    arrays: dict[str, np.ndarray] = {}
    invalid = np.zeros(label.shape, dtype=bool)
    bounds = None
    for name in array_names(ctx.task)[:-1]:
        image, file_nodata, transform = _read_window(paths[name], y, x, ctx)
        image = image.astype(ctx.dtype, copy=False)
        # --nodata overrides the file's tag, as GDAL's -srcnodata does; NaN tags declare NaN.
        nodata = ctx.nodata if ctx.nodata is not None else file_nodata
        mask, _ = apply_nodata(image, label, nodata, paths[name])
        invalid |= mask
        arrays[name] = pad_image_as_nodata(image, mask, ctx.height, ctx.width)
        if ctx.georeferenced and bounds is None:
            bounds = patch_bounds(transform, y, x, ctx.height, ctx.width)
    arrays[label_name] = pad_to(label, ctx.height, ctx.width, IGNORE_INDEX)
    return RawSample(
        candidate.source_id, candidate.split, arrays, bounds, nodata_pixels=int(invalid.sum())
    )


def _read_window(path: Path, y: int, x: int, ctx: _Context) -> tuple[np.ndarray, float | None, Any]:
    """(bands, H, W) of one window (clipped to the file), the file's nodata and transform."""
    with _dataset(path) as src:
        window = Window(x, y, min(ctx.width, src.width - x), min(ctx.height, src.height - y))
        # A fresh array of the window only: memory stays flat however large the file.
        return np.asarray(src.read(window=window)), src.nodata, src.transform
