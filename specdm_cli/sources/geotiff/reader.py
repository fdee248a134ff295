"""GeoTIFF-folder reader: a user's own `images/`+`masks/` or `t1/`+`t2/`+`change/` tiles in."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import MaskFlags
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from specdm_cli.config import Progress
from specdm_cli.fs.space import require_memory
from specdm_cli.manifest import (
    GEOTIFF_FOLDERS,
    IGNORE_INDEX,
    LABEL_ARRAY,
    Task,
    array_names,
    rgb_bands,
)
from specdm_cli.sources.base import (
    NODATA_CODE,
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    apply_nodata,
    label_nodata_mask,
    label_values,
    pad_image_as_nodata,
    pad_to,
    patch_bounds,
    patch_windows,
    remap_labels,
    require_dir,
    window_count,
)
from specdm_cli.sources.geotiff.bands import read_bands
from specdm_cli.sources.geotiff.classes import (
    classes_path,
    codes_from_colours,
    colour_lookup,
    exported_manifest,
    grey_rgb_notes,
    label_nodata_of,
    resolve_classes,
)
from specdm_cli.sources.geotiff.handles import OpenRasters
from specdm_cli.sources.geotiff.headers import (
    Header,
    band_scaling,
    bands_dtype,
    check_all,
    check_stems,
    data_bands,
    output_dtype,
)
from specdm_cli.sources.geotiff.layout import Files, infer_task, pair_files
from specdm_cli.sources.geotiff.selection import (
    bad_bands_note,
    chosen_positions,
    one_bad_band_list,
    refuse_empty_bands,
)
from specdm_cli.sources.geotiff.splits import assign_splits, recorded_splits, share_notes

# Files each loading thread keeps open, per array of a sample (ss: image and mask): the
# current file's and the previous one's, whose last windows a thread may still be reading.
FILES_KEPT_OPEN_PER_ARRAY = 2

# What one planned patch costs before any pixel is read: its Candidate, id string and the
# store's per-sample records (measured about 400 bytes; rounded up).
_CANDIDATE_BYTES = 1024


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
    label_nodata: float | None
    georeferenced: bool
    scaled: bool  # some file scales or offsets its values: every image is read in physical units
    colours: dict[int, int]  # packed RGB -> class code, for masks saved as colours
    declared: frozenset[int]  # a classes file's codes: a tag naming one is not nodata
    positions: tuple[int, ...]  # the images' bands the store keeps (--bands), among data bands

    @property
    def nan_declared(self) -> bool:
        """--nodata nan: NaN is never a value, so it adds to a file's numeric tag (a float
        file tagged -9999 with NaN pixels too needs both) instead of replacing it."""
        return self.nodata is not None and bool(np.isnan(self.nodata))

    @property
    def replaces_tag(self) -> bool:
        return self.nodata is not None and not self.nan_declared


@dataclass(frozen=True)
class _Window:
    """One window of one file: its values and what its header says about them."""

    values: np.ndarray  # (bands, H, W) raw, clipped to the file
    nodata: float | None
    transform: Any
    masked: np.ndarray | None  # (H, W) pixels GDAL masks out; None: none can be
    scales: np.ndarray
    offsets: np.ndarray


PLANNING_PROGRESS_FILES = 100


def read_geotiff(
    raw: Path | None, options: PrepareOptions, progress: Progress | None = None
) -> SourcePlan:
    """Open a folder of labelled rasters: pair files by stem, check headers, plan patches.

    `images/`+`masks/` is task ss, `t1/`+`t2/`+`change/` task cd; files are those `layout.EXTENSIONS`
    lists (every raster extension of the installed GDAL) and ENVI data by its header; others (a specdm
    export's `manifest.json`) are ignored. Headers are read here, mask pixels only to discover
    classes. Samples are patch_size (capped at the largest file), smaller files padded.

    Args:
        raw: the folder holding the array folders.
        options: classes_file, splits_file, val/test fractions, seed, patch_size, overlap,
            nodata, label_nodata.

    Returns:
        The plan; its `load` is thread-safe and reads one window per file, so memory stays flat.

    Raises:
        InputDataError: bad layout, files, bands, sizes, CRS, classes or splits file.
    """
    # Ungeoreferenced files are valid input (spec.crs None says so); rasterio warns on each open.
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    root = require_dir(raw, "geotiff")
    task = infer_task(root)
    files = pair_files(root, task)
    # Planning reads every header and scans every mask: told on the progress where that takes
    # seconds (2,000 tiles: ~15 s), not in a small folder, whose errors stay one line.
    planning = progress if len(files) >= PLANNING_PROGRESS_FILES else None
    checked = check_stems(files, task, planning, bad_bands_chosen=not options.bands)
    headers = {stem: image for stem, (image, _) in checked.items()}
    rgb_masks = [label.path for _, label in checked.values() if label.count == 3]
    grey_notes = grey_rgb_notes(rgb_masks, classes_path(root, options))
    colour_masks = bool(rgb_masks) and grey_notes is None
    first = next(iter(headers.values()))
    crs_by_file = check_all(headers)
    crs = _one_crs(crs_by_file)
    exported = exported_manifest(root, task)
    recorded = recorded_splits(exported, list(files))
    splits, splits_from = assign_splits(list(files), options, recorded)
    height = min(options.patch_size, max(h.height for h in headers.values()))
    width = min(options.patch_size, max(h.width for h in headers.values()))
    # Planned from the headers before any pixel is read, the class scan included.
    candidates = _candidates(headers, splits, height, width, options)
    resolved = resolve_classes(root, options, task, files, colour_masks, exported, planning)
    classes, classes_from = resolved.classes, resolved.source
    file_bands = read_bands(first.path)
    bad = () if options.bands else one_bad_band_list(list(headers.values()))
    positions = chosen_positions(options.bands, file_bands, first.path, bad)
    for name in array_names(task)[:-1]:
        refuse_empty_bands(next(iter(files.values()))[name], positions, options.nodata)
    bands = [file_bands[p] for p in positions]
    scaled = any(h.scaled for h in headers.values())
    spec = SourceSpec(
        dataset="geotiff",
        task=task,
        bands=bands,
        classes=classes,
        dtype=output_dtype(first.dtype, first.path, scaled),
        height=height,
        width=width,
        crs=crs,
        rgb_bands=rgb_bands(bands),
        details={
            "layout": "+".join(GEOTIFF_FOLDERS[name] for name in array_names(task)),
            "files": len(files),
            "classes_from": classes_from,
            "splits_from": splits_from,
            "label_codes": {str(c.code): c.index for c in classes},
            **_optional_details(options, positions, colour_masks, scaled, crs, crs_by_file),
        },
    )
    codes = tuple(int(str(c.code)) for c in classes)
    context = _Context(
        task, files, codes, height, width, spec.dtype, options.nodata, options.label_nodata,
        bool(crs), scaled, colour_lookup(classes) if colour_masks else {}, resolved.declared,
        tuple(positions),
    )  # fmt: skip
    rasters = OpenRasters(keep=FILES_KEPT_OPEN_PER_ARRAY * len(array_names(task)))
    load = functools.partial(_load, ctx=context, rasters=rasters)
    notes = [
        *_crs_notes(crs_by_file, crs), *_padding_notes(headers, height, width),
        *_alpha_notes(headers),
        *(share_notes(splits, options) if recorded is None else _unread_split_options(options, splits_from)),
        *_change_code_notes(task, codes, classes_from), *resolved.notes, *(grey_notes or []),
        *([bad_bands_note(bad, first.path)] if bad else []),
    ]  # fmt: skip
    return SourcePlan(
        spec=spec, candidates=candidates, load=load, warnings=notes, close=rasters.close
    )


def _optional_details(
    options: PrepareOptions,
    positions: list[int],
    colour_masks: bool,
    scaled: bool,
    crs: str | None,
    crs_by_file: dict[str, str | None],
) -> dict[str, object]:
    """The manifest details a plain folder of rasters does not need."""
    details: dict[str, object] = {}
    if options.bands:
        details["bands_read"] = [p + 1 for p in positions]
    if colour_masks:
        details["labels"] = "RGB class colours of the classes file"
    if scaled:
        details["values"] = "raw x scale + offset (the files' GDAL scale and offset)"
    # Georeferenced, but not in one CRS: no bounds; a sample's source_id names its file.
    if crs is None and any(crs_by_file.values()):
        details["crs_by_file"] = crs_by_file
    return details


def _unread_split_options(options: PrepareOptions, splits_from: str) -> list[str]:
    """Fractions or a seed set away from their defaults where the data records its splits
    (split folders, an export's manifest): they are not read, and said so."""
    defaults = PrepareOptions()
    unread = [
        f"--{name.replace('_', '-')}"
        for name in ("val_fraction", "test_fraction", "seed")
        if getattr(options, name) != getattr(defaults, name)
    ]
    if not unread or options.splits_file is not None:
        return []
    return [f"warning: the splits come from {splits_from}: {', '.join(unread)} not read"]


def _padding_notes(headers: dict[str, Header], height: int, width: int) -> list[str]:
    """Files smaller than the patch are padded: most of a small file's patch can be fill."""
    small = [h for h in headers.values() if h.height < height or h.width < width]
    if not small:
        return []
    example = min(small, key=lambda h: h.height * h.width)
    return [
        f"note: {len(small)} of {len(headers)} files are smaller than the {height}x{width} patch "
        f"(e.g. {example.path.name}, {example.height}x{example.width}): padded, the padding "
        "labelled 255 (`--patch-size` sets the patch)"
    ]


def _one_crs(crs_by_file: dict[str, str | None]) -> str | None:
    """The CRS every file shares; None when they have none, or several."""
    distinct = set(crs_by_file.values())
    return distinct.pop() if len(distinct) == 1 else None


def _crs_notes(crs_by_file: dict[str, str | None], crs: str | None) -> list[str]:
    distinct = sorted({c for c in crs_by_file.values() if c is not None})
    if crs is not None or not distinct:
        return []
    shown = ", ".join(distinct[:4]) + (", ..." if len(distinct) > 4 else "")
    return [
        f"note: the files lie in {len(distinct)} CRSs ({shown}): the store keeps no bounds or "
        "CRS; each file's CRS is in the manifest (source.details.crs_by_file)"
    ]


def _change_code_notes(task: Task, codes: tuple[int, ...], classes_from: str) -> list[str]:
    """Change masks discovered to hold one code or more than two: said, as it is seldom meant."""
    if task != "cd" or classes_from != "masks" or len(codes) == 2:
        return []
    if len(codes) == 1:
        return [
            f"warning: the change masks hold one class code ({codes[0]}), the rest is no data, "
            "so the store has no change / no change pair; if their nodata tag marks no change "
            "(gdal_rasterize -a_nodata 0), declare both codes in a classes file (--classes)"
        ]
    return [
        f"warning: the change masks hold {len(codes)} codes ({', '.join(map(str, codes))}), so "
        f"the store has {len(codes)} change classes, not change / no change; if a code means "
        "no data, pass --label-nodata CODE"
    ]


def _alpha_notes(headers: dict[str, Header]) -> list[str]:
    """A band declared alpha is read as a mask, not data: say so, since GDAL declares the 4th
    band of any 4-band 8-bit GeoTIFF written with default options alpha (an RGB+NIR tile's NIR)."""
    alpha = [h.path for h in headers.values() if h.alpha]
    if not alpha:
        return []
    return [
        f"warning: {len(alpha)} image file(s) declare an alpha band ({alpha[0]} first), read as "
        "their nodata mask, not as an image band; if it holds data (e.g. NIR), clear it with "
        "`rio edit-info FILE --colorinterp red,green,blue,undefined` (rasterio's command, "
        "installed with specdm; gdal_edit.py -colorinterp_4 undefined FILE does the same)"
    ]


def _candidates(
    headers: dict[str, Header],
    splits: dict[str, str],
    height: int,
    width: int,
    options: PrepareOptions,
) -> list[Candidate]:
    planned = sum(
        window_count(h.height, h.width, options.patch_size, options.overlap)
        for h in headers.values()
    )
    require_memory(
        planned * _CANDIDATE_BYTES,
        f"planning {planned} patches",
        "check the files' sizes (a damaged header can claim any size), or prepare fewer patches: "
        "a larger --patch-size, --overlap 0",
        next(iter(headers.values())).path,
    )
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


def _load(candidate: Candidate, *, ctx: _Context, rasters: OpenRasters) -> RawSample:
    """Read one sample's windows (each thread reads through datasets of its own, so loads may
    run in threads)."""
    stem, y, x = candidate.ref
    paths = ctx.files[stem]
    label_name = LABEL_ARRAY[ctx.task]
    raw_label = _read_window(rasters, paths[label_name], y, x, ctx)
    transparent = _transparent(raw_label)
    if len(raw_label.values) == 3 and ctx.colours:  # colours: a colour is a class, never nodata
        raw_codes = codes_from_colours(
            raw_label.values, ctx.colours, paths[label_name], skip=transparent
        )
        label_nodata = None
    else:
        raw_codes = raw_label.values[0]  # one band of codes, or grey RGB: R holds them
        # --label-nodata overrides the mask's tag, as --nodata does the image's.
        label_nodata = label_nodata_of(ctx.label_nodata, raw_label.nodata, ctx.declared)
    values = label_values(raw_codes, label_nodata)
    if transparent is not None:
        values[transparent] = NODATA_CODE
    label = remap_labels(values, ctx.codes, paths[label_name])
    arrays: dict[str, np.ndarray] = {}
    invalid = np.zeros(label.shape, dtype=bool)
    label_invalid = label_nodata_mask(raw_codes, label_nodata)
    if transparent is not None:
        label_invalid |= transparent
    bounds = None
    for name in array_names(ctx.task)[:-1]:
        window = _read_window(rasters, paths[name], y, x, ctx, ctx.positions)
        image = window.values.astype(ctx.dtype, copy=False)
        # --nodata overrides the file's tag, as GDAL's -srcnodata does; NaN tags declare NaN.
        nodata = ctx.nodata if ctx.replaces_tag else window.nodata
        # Nodata is a raw value (as GDAL's tag is), so pixels are matched before any scaling.
        mask, _ = apply_nodata(
            image, label, nodata, paths[name], ctx.nan_declared, masked=window.masked
        )
        if ctx.scaled:
            image = _physical(image, window)
        invalid |= mask
        arrays[name] = pad_image_as_nodata(image, mask, ctx.height, ctx.width)
        if ctx.georeferenced and bounds is None:
            bounds = patch_bounds(window.transform, y, x, ctx.height, ctx.width)
    arrays[label_name] = pad_to(label, ctx.height, ctx.width, IGNORE_INDEX)
    return RawSample(
        candidate.source_id,
        candidate.split,
        arrays,
        bounds,
        nodata_pixels=int((invalid | label_invalid).sum()),
        image_nodata=pad_to(invalid, ctx.height, ctx.width, True),
        covered=(label.shape[0], label.shape[1]),
    )


def _physical(image: np.ndarray, window: _Window) -> np.ndarray:
    """Raw values in the units the file's scale and offset give, per band (float32): tiles
    written with other scales or offsets (e.g. Sentinel-2 L2A before and after its -1000
    offset of 2022) then agree in the store."""
    scaled = image.astype(np.float64) * window.scales[:, None, None] + window.offsets[:, None, None]
    physical: np.ndarray = scaled.astype(np.float32)
    return physical


def _read_window(
    rasters: OpenRasters,
    path: Path,
    y: int,
    x: int,
    ctx: _Context,
    positions: tuple[int, ...] | None = None,
) -> _Window:
    """One window of the file's data bands (those at `positions` among them, where given),
    clipped to the file, with the pixels GDAL masks out."""
    with rasters.reading(path) as src:
        window = Window(x, y, min(ctx.width, src.width - x), min(ctx.height, src.height - y))
        bands = data_bands(src)
        if positions is not None:
            bands = [bands[p] for p in positions]
        # A fresh array of the window only: memory stays flat however large the file.
        values = _read_bands(src, bands, window)
        masked = _gdal_masked(src, bands, window, ctx.replaces_tag)
        scales, offsets = band_scaling(src, bands)
        return _Window(values, src.nodata, src.transform, masked, scales, offsets)


def _read_bands(src: Any, bands: list[int], window: Window) -> np.ndarray:
    """`bands` of the window, in the type that holds them all: rasterio reads bands of several
    types (a VRT of band files) only one at a time."""
    if len({src.dtypes[i - 1] for i in bands}) <= 1:
        return np.asarray(src.read(bands, window=window))
    dtype = bands_dtype(src, bands)
    return np.stack([src.read(i, window=window).astype(dtype) for i in bands])


def _transparent(window: _Window) -> np.ndarray | None:
    """A label's pixels its alpha band (or internal mask) leaves out: unlabelled. A nodata tag
    is not this: it is read by value, as --label-nodata replaces it."""
    if window.masked is None or window.nodata is not None:
        return None
    return window.masked


def _gdal_masked(
    src: Any, bands: list[int], window: Window, nodata_overridden: bool
) -> np.ndarray | None:
    """Pixels of the window that GDAL's mask rules leave out: an internal or .msk mask, an alpha
    band, or the nodata tag as GDAL matches it (a float32 tag written rounded, -3.40282e+38,
    still matches -3.4028235e+38 pixels, where `==` on the tag value does not). A --nodata replaces
    the tag, so then only the masks that are not the tag's count."""
    flags = src.mask_flag_enums
    if all(MaskFlags.all_valid in band for band in flags):
        return None
    stored = any(MaskFlags.per_dataset in band for band in flags)
    tagged = any(MaskFlags.nodata in band for band in flags)
    # An integer tag matches exactly by `==`: GDAL's mask would only read the window again.
    if not stored and (nodata_overridden or not tagged or np.dtype(src.dtypes[0]).kind != "f"):
        return None
    return np.asarray((src.read_masks(bands, window=window) == 0).any(axis=0))
