"""Raster folders: which layout, which files pair up, and what their headers say."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.drivers import raster_driver_extensions
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.manifest import (
    GEOTIFF_FOLDERS,
    LABEL_ARRAY,
    Task,
    array_names,
)
from specdm_cli.sources.base import broken_link
from specdm_cli.sources.geotiff.crs import crs_name, one_spelling, same_crs, shown_crs, told_apart

# A JPEG is lossy: a JPEG mask's class codes change along every edge, so masks are refused.
_LOSSY = (".jpg", ".jpeg")
# ENVI/ERDAS data files; ENVI data of any other name (`.raw` of SPECIM cameras, none) is found
# by its `.hdr`.
_ENVI = (".img", ".dat", ".bsq", ".bil", ".bip")
# HDF files (PRISMA's `.he5`, MODIS `.hdf`) are listed so that they are refused by name (they
# hold subdatasets) rather than passed over; GDAL names no extension for them.
_HDF = (".h5", ".hdf5", ".he5", ".hdf")
# Files beside ENVI data that are no raster: its header, ENVI's statistics and display files,
# GDAL's sidecars (`.aux.xml` ends in `.xml`), world and projection files.
_SIDECARS = (".hdr", ".sta", ".enp", ".xml", ".aux", ".msk", ".ovr", ".tfw", ".wld", ".prj")
# What cameras and people leave beside a cube (`t.raw` + `t.hdr` + `t.log`): logs, notes,
# metadata, reports, styles, archives; none is a raster, whatever header lies beside it.
_COMPANIONS = frozenset({
    ".txt", ".log", ".csv", ".tsv", ".json", ".yaml", ".yml", ".ini", ".cfg",
    ".md", ".rst", ".html", ".htm", ".pdf", ".doc", ".docx", ".rtf", ".qml", ".sld",
    ".zip", ".gz", ".7z", ".tar", ".py", ".sh", ".db", ".kml", ".kmz",
})  # fmt: skip
_NOT_RASTERS = _COMPANIONS.union(_SIDECARS)
# Labels drawn as polygons (GeoJSON, shapefiles, GeoPackage, COCO-style JSON): no masks yet.
_VECTORS = frozenset({
    ".geojson", ".json", ".shp", ".gpkg", ".kml", ".kmz", ".gml", ".fgb", ".parquet",
})  # fmt: skip
# What a `.json` of polygon labels holds near its start: GeoJSON's features, COCO's annotations.
_VECTOR_JSON_KEYS = (b'"FeatureCollection"', b'"Feature"', b'"coordinates"', b'"annotations"')
# Databases that hold vector layers as often as rasters (an annotation GeoPackage in masks/)
# and web-map tile pyramids: not tiles of a dataset.
_CONTAINERS = frozenset({".gpkg", ".gpkg.zip", ".sqlite", ".mbtiles"})


def _gdal_extensions() -> tuple[str, ...]:
    """Every extension a raster driver of this GDAL build names (netCDF, WebP, ERDAS, ASCII
    grids, ...), with the ones above: the files of a tile folder that are read as rasters."""
    named = {f".{ext.lower()}" for ext in raster_driver_extensions()}
    named -= _NOT_RASTERS | _CONTAINERS
    return tuple(sorted(named.union(_LOSSY, _ENVI, _HDF, (".tif", ".tiff", ".vrt"))))


EXTENSIONS = _gdal_extensions()
_TASKS: tuple[Task, ...] = ("ss", "cd")
# Split folders inside images/ and masks/, by the names datasets give them.
SPLIT_FOLDER_NAMES = {
    "train": "train", "training": "train", "val": "val", "valid": "val",
    "validation": "val", "test": "test", "testing": "test",
}  # fmt: skip

Files = dict[str, dict[str, Path]]  # stem -> array name -> path


@dataclass(frozen=True)
class Header:
    """Facts of one file read from its header at open time."""

    path: Path
    count: int  # data bands: an alpha band is GDAL's mask of the others, not a band of the image
    dtype: str
    height: int
    width: int
    crs: str | None
    # The pixel-to-world transform (a..f) when the file has one (a CRS or not: masks are often
    # written with the image's transform and no CRS); None for the identity (no georeferencing).
    grid: tuple[float, ...] | None = None
    scaled: bool = False  # a band carries a GDAL scale or offset: values = raw x scale + offset
    alpha: bool = False  # an alpha band, left out of `count`
    names: tuple[str, ...] = ()  # the data bands' descriptions ("" where a band has none)
    lossy: str | None = None  # how the file is compressed with loss (None: losslessly or not)


def layout_folder(root: Path, name: str) -> Path:
    """The folder of array `name` in `root`: `images/`, else the one folder of that name in
    another case (`Images/`, as Windows and Kaggle trees have it), else the missing `images/`."""
    exact = root / GEOTIFF_FOLDERS[name]
    if exact.is_dir() or not root.is_dir():
        return exact
    other_case = [
        child for child in sorted(root.iterdir())
        if child.is_dir() and child.name.lower() == exact.name
    ]  # fmt: skip
    if len(other_case) > 1:
        raise InputDataError(
            f"{' and '.join(c.name + '/' for c in other_case)} differ only by case",
            root,
            f"keep one of them, named {exact.name}/",
        )
    return other_case[0] if other_case else exact


# Folder names that hold masks in other datasets' layouts: named when masks/ is missing.
_MASK_FOLDER_NAMES = ("labels", "label", "annotations", "ann_dir", "gt", "groundtruth", "mask")


def _folders_present(root: Path) -> dict[Task, list[bool]]:
    """For each task, which of its folders `root` holds."""
    return {task: [layout_folder(root, n).is_dir() for n in array_names(task)] for task in _TASKS}


def _missing_folder(root: Path, folder: str) -> InputDataError:
    """`folder` is missing beside the others: named, with a folder that may hold its files."""
    near = [
        child.name for child in sorted(root.iterdir())
        if child.is_dir() and folder == "masks" and child.name.lower() in _MASK_FOLDER_NAMES
    ]  # fmt: skip
    hint = (
        f"{root.name}/ has {near[0]}/: rename it masks/ (or link it: ln -s {near[0]} masks)"
        if near
        else f"add {folder}/ beside the others"
    )
    return InputDataError("folder missing", root / folder, hint)


def _nested_layout(root: Path) -> Path | None:
    """A subfolder holding a whole layout: an archive unpacked into a folder of its own name."""
    children = sorted(child for child in root.iterdir() if child.is_dir())
    return next((c for c in children if any(map(all, _folders_present(c).values()))), None)


def _split_layouts(root: Path) -> list[Path]:
    """Split folders at the top, each holding a whole layout (`train/images/`, `val/images/`,
    as Kaggle-style downloads ship), where `root` holds no layout of its own."""
    if any(map(any, _folders_present(root).values())):
        return []
    layouts = [f for f in _split_folders(root) if any(map(any, _folders_present(f).values()))]
    for layout in layouts:
        if not any(map(all, _folders_present(layout).values())):
            raise InputDataError(
                "a split folder lacks the folders its layout needs (a test split shipped "
                "without its masks?)",
                layout,
                f"add them, or move {layout.name}/ out of {root.name}/ to prepare the others",
            )
    return layouts


def infer_task(root: Path) -> Task:
    layouts = _split_layouts(root)
    tasks = {infer_task(layout) for layout in layouts}
    if len(tasks) == 1:
        return tasks.pop()
    if tasks:
        raise InputDataError(
            f"split folders of both layouts ({', '.join(f.name + '/' for f in layouts)})",
            root,
            "keep one layout per dataset (ss or cd)",
        )
    present = _folders_present(root)
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
            raise _missing_folder(root, GEOTIFF_FOLDERS[array_names(task)[found.index(False)]])
    nested = _nested_layout(root) if root.is_dir() else None
    raise InputDataError(
        "no images/+masks/ (segmentation) or t1/+t2/+change/ (change detection) folders",
        root,
        f"the tiles are one folder down: pass {nested}"
        if nested
        else "put the tiles in those folders, paired by file name",
    )


def _list_rasters(folder: Path) -> dict[str, Path]:
    """The folder's rasters by pairing stem; where it holds none but split folders
    (`images/train/`, `masks/train/`, as many downloads ship), theirs, by `train/<stem>`."""
    rasters = _list_folder(folder)
    if rasters:
        return rasters
    for split_folder in _split_folders(folder):
        rasters |= {
            f"{split_folder.name}/{stem}": path for stem, path in _list_folder(split_folder).items()
        }
    if not rasters:
        raise _no_rasters(folder)
    return rasters


def _split_folders(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and p.name.lower() in SPLIT_FOLDER_NAMES
    )


def split_of_stem(stem: str) -> str | None:
    """The split a stem's folder names (`train/tile_00` -> train), or None outside one."""
    folder, slash, _ = stem.partition("/")
    return SPLIT_FOLDER_NAMES.get(folder.lower()) if slash else None


def _list_folder(folder: Path) -> dict[str, Path]:
    rasters: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = raster_stem(path)
        if stem is None:
            continue
        if stem in rasters:
            raise InputDataError(
                f"{rasters[stem].name} and {path.name} share the stem {stem!r}",
                path,
                "files pair by name without extension: keep one of them in the folder",
            )
        rasters[stem] = path
    return rasters


def _no_rasters(folder: Path) -> InputDataError:
    """What a folder without rasters holds instead, where that tells the fix: polygons to
    rasterize, or tiles one folder down (split folders)."""
    vectors = sorted(p.name for p in folder.iterdir() if _holds_vectors(p))
    if vectors:
        return InputDataError(
            f"no raster files in folder, but vector labels ({', '.join(vectors[:2])}"
            f"{', ...' if len(vectors) > 2 else ''})",
            folder,
            "rasterize each onto its image's grid (gdal_rasterize -a CLASS_FIELD -te/-tr of "
            "the image) and save the masks here by the images' names",
        )
    nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and _holds_rasters(p))
    if nested:
        return InputDataError(
            f"no raster files in folder; they are in its subfolders "
            f"({', '.join(name + '/' for name in nested)})",
            folder,
            f"move them up into {folder.name}/ (and their partners into theirs) and give their "
            "splits as --splits FILE.csv (columns stem,split)",
        )
    return InputDataError(
        "no raster files in folder (none of the extensions GDAL reads, no ENVI .hdr)",
        folder,
        "add the tiles",
    )


def _holds_vectors(path: Path) -> bool:
    """A file of polygon labels; a `.json` only where it holds features or annotations (GeoJSON
    named `.json`, COCO), not a `classes.json` beside the masks."""
    suffix = path.suffix.lower()
    if suffix != ".json" or not path.is_file():
        return suffix in _VECTORS
    try:
        with path.open("rb") as file:
            start = file.read(1 << 20)
    except OSError:
        return False
    return any(key in start for key in _VECTOR_JSON_KEYS)


def _holds_rasters(folder: Path) -> bool:
    return any(raster_stem(p) is not None for p in folder.iterdir())


def raster_stem(path: Path) -> str | None:
    """The pairing stem of a raster file, or None for anything else (headers, sidecars)."""
    # Hidden names are temp files of an interrupted writer, never data.
    if path.name.startswith("."):
        return None
    if path.is_symlink() and not path.exists() and path.suffix.lower() in EXTENSIONS:
        raise broken_link(path)
    if not path.is_file():
        return None
    if path.suffix.lower() in EXTENSIONS or _beside_envi_header(path):
        return pairing_name(path.stem)
    return None


def pairing_name(name: str) -> str:
    """`name` in Unicode's composed form (NFC): macOS and its zips write `Zürich` decomposed
    (u + combining diaeresis), Linux and Windows tools composed; both name one tile."""
    return unicodedata.normalize("NFC", name)


def _beside_envi_header(path: Path) -> bool:
    """ENVI data with a header where GDAL's ENVI driver looks: `<stem>.hdr` or `<name>.hdr`."""
    if path.suffix.lower() in _NOT_RASTERS:
        return False
    return path.with_suffix(".hdr").is_file() or path.with_name(f"{path.name}.hdr").is_file()


def pair_files(root: Path, task: Task) -> Files:
    layouts = _split_layouts(root)
    if layouts:  # `train/images/x.tif` pairs as `train/x`, as `images/train/x.tif` does
        return {
            f"{layout.name}/{stem}": paths
            for layout in layouts
            for stem, paths in pair_files(layout, task).items()
        }
    names = array_names(task)
    folders = {name: layout_folder(root, name) for name in names}
    listed = {name: _list_rasters(folders[name]) for name in names}
    _one_spelling_per_split(listed)
    _refuse_split_without_partner(folders, listed)
    _refuse_lossy_labels(listed[LABEL_ARRAY[task]].values())
    stems = sorted(set().union(*listed.values()))
    # An image's missing partner is told first: the fix named is then the mask's name.
    for stem in sorted(stems, key=lambda stem: stem not in listed[names[0]]):
        have = [n for n in names if stem in listed[n]]
        if len(have) < len(names):
            missing = next(n for n in names if stem not in listed[n])
            raise _no_partner(stem, listed[have[0]], folders[missing], listed[missing])
    return {stem: {name: listed[name][stem] for name in names} for stem in stems}


def _refuse_split_without_partner(
    folders: dict[str, Path], listed: dict[str, dict[str, Path]]
) -> None:
    """`images/test/` without `masks/test/` (a test split shipped unlabelled): the whole split
    folder named, not the first of its hundreds of tiles."""
    splits = {name: {split_of_stem(stem) for stem in rasters} for name, rasters in listed.items()}
    for name, found in splits.items():
        for other, theirs in splits.items():
            lacking = sorted(split for split in found - theirs if split is not None)
            if lacking:
                held = next(p for s, p in listed[name].items() if split_of_stem(s) == lacking[0])
                raise _split_without_partner(held.parent, folders[other], None in theirs)


def _split_without_partner(held: Path, other: Path, other_flat: bool) -> InputDataError:
    """`held` (a split folder with files) has no files in `other`'s folder of its split."""
    split = SPLIT_FOLDER_NAMES[held.name.lower()]
    mine = f"{held.parent.name}/{held.name}/"
    if other_flat:
        return InputDataError(
            f"{mine} is a split folder, and {other.name}/ holds its files without split folders",
            other,
            f"put the files of both in the same split folders ({other.name}/{held.name}/ ...)",
        )
    spellings = {word for word, meant in SPLIT_FOLDER_NAMES.items() if meant == split}
    named = [p for p in sorted(other.iterdir()) if p.is_dir() and p.name.lower() in spellings]
    where = named[0] if named else other / held.name
    what = "holds no files" if named else "is missing"
    return InputDataError(
        f"{mine} has files and {other.name}/{where.name}/ {what} (a {split} split shipped "
        f"without its {other.name}?)",
        where,
        f"add them, or move {mine} out of {held.parent.name}/ to prepare the other splits",
    )


# Suffixes datasets add to a tile's id in one folder (DeepGlobe: 123_sat.jpg, 123_mask.png).
_ROLE_SUFFIXES = ("sat", "img", "image", "rgb", "mask", "masks", "label", "labels", "gt", "lbl")


def _no_partner(
    stem: str, rasters: dict[str, Path], folder: Path, others: dict[str, Path]
) -> InputDataError:
    """A tile of `rasters` without its file in `folder` (holding `others`): where `folder`
    holds the tile under a suffixed name (`t0_mask.tif` for `t0.tif`), that is named, with the
    rename."""
    partner = rasters[stem]
    unpaired = sorted(other for other in others if other not in rasters)
    near = next((others[o] for o in unpaired if _same_tile(stem, o)), None)
    if near is not None:
        wanted = near.with_name(f"{partner.stem}{near.suffix}")  # renamed where it is
        return InputDataError(
            f"{partner.name} has no partner in {folder.name}/, which holds {near.name}: files "
            "pair by the same name",
            near,
            f"give each file its partner's name (e.g. mv '{near}' '{wanted}')",
        )
    suffix = _usual_suffix(others.values(), partner.suffix)
    split = _split_folder_of(stem, others)
    return InputDataError(
        f"{partner.name} has no partner in {folder.name}/",
        (split or folder / stem.rpartition("/")[0]) / f"{partner.stem}{suffix}",
        f"add the missing file, or remove {partner.name}",
    )


def _split_folder_of(stem: str, others: dict[str, Path]) -> Path | None:
    """The folder holding the other side's files of `stem`'s split, spelled as it is on disk
    (`masks/train/` where the images have `images/Train/`), or None: no file of that split."""
    split = split_of_stem(stem)
    if split is None:
        return None
    return next((p.parent for s, p in sorted(others.items()) if split_of_stem(s) == split), None)


def _same_tile(stem: str, other: str) -> bool:
    """`other` names the tile `stem` names with a role suffix on either or both."""

    def base(name: str) -> str:
        head, sep, tail = name.rpartition("_") if "_" in name else name.rpartition("-")
        return head if sep and tail.lower() in _ROLE_SUFFIXES else name

    return stem != other and base(stem) == base(other)


def _one_spelling_per_split(listed: dict[str, dict[str, Path]]) -> None:
    """`images/Train/` beside `masks/train/` (or `masks/training/`) is one split: each tile of
    a split takes the spelling of the first folder listed for it (the images'), so they pair."""
    spellings: dict[str, str] = {}
    for rasters in listed.values():
        for stem in list(rasters):
            folder, _, rest = stem.partition("/")
            split = split_of_stem(stem)
            if split is None:
                continue
            spelling = spellings.setdefault(split, folder)
            if spelling == folder:
                continue
            same = f"{spelling}/{rest}"
            if same in rasters:
                raise InputDataError(
                    f"two folders of the {split} split ({spelling}/ and {folder}/) hold {rest}",
                    rasters[stem],
                    "keep one folder per split",
                )
            rasters[same] = rasters.pop(stem)


def _refuse_lossy_labels(labels: Iterable[Path]) -> None:
    lossy = next((path for path in labels if path.suffix.lower() in _LOSSY), None)
    if lossy is not None:
        raise InputDataError(
            "a JPEG mask is lossy: its class codes change along every edge",
            lossy,
            "export the masks as PNG or GeoTIFF",
        )


def _usual_suffix(paths: Iterable[Path], fallback: str) -> str:
    """The extension most files of a folder have: a missing file of a PNG set (or of mmseg's
    `.png` masks beside `.tif` images) is named as the user would save it, not as `.tif`."""
    counts = Counter(path.suffix for path in paths)
    return counts.most_common(1)[0][0] if counts else fallback


@contextmanager
def open_raster(path: Path) -> Iterator[Any]:
    """An open rasterio dataset; GDAL failures become one input-data line naming the file."""
    with raster_errors(path), open_dataset(path) as src:
        yield src


def open_dataset(path: Path) -> Any:
    """`rasterio.open(path)`, without GDAL listing the file's folder to find its sidecars: it
    asks for each (`.aux.xml`, `.msk`, ENVI's `.hdr`) by name instead. In a folder of 2,000
    tiles the listing was most of each open (about 2 of 3 ms), and planning opens every file."""
    # Set per thread where it is not the main one (rasterio's Env), so loading threads may open.
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="TRUE"):
        return rasterio.open(path)


@contextmanager
def raster_errors(path: Path) -> Iterator[None]:
    """GDAL failures opening or reading `path` become one input-data line naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise InputDataError(
            "file disappeared after listing", path, "restore the file and rerun"
        ) from None
    except (RasterioError, OSError) as exc:
        reason = reason_of(exc, path)
        raise InputDataError(
            f"unreadable or corrupt raster ({reason})",
            path,
            "re-export or remove the file (a VRT: restore the files it names)",
        ) from None


def _header(path: Path) -> Header:
    with open_raster(path) as src:
        _refuse_without_bands(src, path)
        crs = None if src.crs is None else crs_name(src.crs.to_wkt())
        grid = None if src.transform.is_identity else tuple(src.transform)[:6]
        bands = data_bands(src)
        scales, offsets = band_scaling(src, bands)
        scaled = bool((scales != 1).any() or (offsets != 0).any())
        dtype = str(bands_dtype(src, bands))
        alpha = len(bands) < src.count
        names = tuple((src.descriptions[i - 1] or "").strip() for i in bands)
        return Header(
            path, len(bands), dtype, src.height, src.width, crs, grid, scaled, alpha, names,
            lossy_compression(src),
        )  # fmt: skip


def lossy_compression(src: Any) -> str | None:
    """How a raster is compressed with loss and what that does to codes, in words, or None:
    JPEG in a TIFF (GDAL's `JPEG`, `YCbCr JPEG`), LERC with an error above half a code (`LERC`,
    `LERC_DEFLATE`, `LERC_ZSTD`), or what GDAL reports as lossy (JPEG 2000 unless written with
    REVERSIBLE=YES, WebP unless lossless). Fine for an image; a mask's codes change."""
    structure = src.tags(ns="IMAGE_STRUCTURE")
    method = str(structure.get("COMPRESSION", "")).upper()
    edges = "its class codes change along edges"
    if "JPEG" in method:
        return f"JPEG-compressed: {edges}"
    error = float(structure.get("MAX_Z_ERROR") or 0)
    if method.startswith("LERC") and error > 0.5:
        return f"LERC-compressed with an error up to {error:g}: its class codes move by up to that"
    if structure.get("COMPRESSION_REVERSIBILITY") == "LOSSY":
        return f"compressed with loss ({src.driver}): {edges}"
    return None


def _refuse_without_bands(src: Any, path: Path) -> None:
    """A netCDF or HDF file of several variables opens as a list of subdatasets, no bands:
    which of them are the image's bands (and in which order) only its user knows."""
    if src.count:
        return
    names = [name.rsplit(":", 1)[-1] for name in src.subdatasets]
    if not names:
        raise InputDataError("the raster holds no bands", path, "re-export or remove the file")
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    raise InputDataError(
        f"holds subdatasets ({shown}), no bands of its own",
        path,
        f"stack the bands into one file: rio stack --driver GTiff '{src.subdatasets[0]}' ... "
        f"{path.stem}.tif (or gdalbuildvrt -separate {path.stem}.vrt with them)",
    )


def data_bands(src: Any) -> list[int]:
    """The 1-based indexes of the bands that hold values: all but an alpha band (an RGBA
    export's fourth band), which GDAL reads as the mask of the others."""
    return [i + 1 for i, kind in enumerate(src.colorinterp) if kind != ColorInterp.alpha]


def bands_dtype(src: Any, bands: list[int]) -> np.dtype[Any]:
    """The type that holds every one of `bands` (a VRT of band files keeps each file's type:
    UInt16 and Float32 read as float32)."""
    return np.result_type(*(src.dtypes[i - 1] for i in bands or [1]))


def band_scaling(src: Any, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(scales, offsets) of `bands` as GDAL gives them (1 and 0 where a file sets none)."""
    scales = np.array([src.scales[i - 1] for i in bands], dtype=np.float64)
    offsets = np.array([src.offsets[i - 1] for i in bands], dtype=np.float64)
    return scales, offsets


def check_stems(
    files: Files, task: Task, progress: Progress | None = None
) -> dict[str, tuple[Header, Header]]:
    """`check_stem` of every stem, reported to `progress` as the stage "reading headers": a
    folder of 2,000 tiles takes seconds before the first patch is planned."""
    checked = {}
    for done, (stem, paths) in enumerate(files.items(), start=1):
        checked[stem] = check_stem(paths, task)
        if progress is not None:
            progress("reading headers", done, len(files))
    return checked


def check_stem(paths: dict[str, Path], task: Task) -> tuple[Header, Header]:
    """Headers of the stem's (first) image and of its label, after checking they agree. A label
    is one band of class codes, or three of class colours (RGB, as labelling tools export)."""
    images = [_header(paths[name]) for name in array_names(task)[:-1]]
    label = _header(paths[LABEL_ARRAY[task]])
    for other in [*images[1:], label]:
        if (other.height, other.width) != (images[0].height, images[0].width):
            raise InputDataError(
                f"size {other.height}x{other.width} differs from its image's "
                f"{images[0].height}x{images[0].width}",
                other.path,
                _onto_grid_hint("resample", other, images[0], other is label)
                if other.grid and images[0].grid
                else f"make it match {images[0].path.name}",
            )
    for other in [*images[1:], label]:
        _same_grid(images[0], other, other is label)
    if label.lossy is not None:
        raise InputDataError(
            f"the mask is {label.lossy}",
            label.path,
            "export the masks again from their source (the labelling tool or the original "
            "files) without loss, as PNG or GeoTIFF (DEFLATE, LZW); compressing this file again "
            "keeps its damage",
        )
    # An alpha band (RGBA, LA exports of labelling tools) marks unlabelled pixels: not a band.
    if label.count not in (1, 3):
        raise InputDataError(
            f"label file has {label.count} bands, expected 1 (class codes) or "
            "3 (RGB class colours), each with an alpha band or not",
            label.path,
            "save labels as one band of class codes, or as RGB colours that --classes lists",
        )
    if label.count == 3 and label.dtype != "uint8":
        raise InputDataError(
            f"RGB label file holds {label.dtype} values, not 8-bit colours",
            label.path,
            "save colour masks as 8-bit RGB (PNG or GeoTIFF), or labels as one band of codes",
        )
    image = images[0] if len(images) == 1 else _same_bands(images[0], images[1])
    # A cd pair is scaled, or alpha-masked, when either phase is.
    return replace(
        image, scaled=any(h.scaled for h in images), alpha=any(h.alpha for h in images)
    ), label


def _same_grid(image: Header, other: Header, label: bool) -> None:
    """Files of one stem are read pixel for pixel, so where both are georeferenced they must
    lie on one grid: the same CRS (where both name one), origin and pixel size (to a hundredth
    of a pixel). A mask without a transform is taken as on its image's grid."""
    if image.grid is None or other.grid is None:
        return
    if other.crs is not None and image.crs is not None and not same_crs(other.crs, image.crs):
        shown, image_shown = told_apart(other.crs, image.crs)
        raise InputDataError(
            f"CRS {shown} differs from its image's {image_shown}",
            other.path,
            _onto_grid_hint("reproject", other, image, label),
        )
    pixel = max(abs(image.grid[0]), abs(image.grid[4]), 1e-12)
    if any(abs(x - y) > 0.01 * pixel for x, y in zip(other.grid, image.grid, strict=True)):
        raise InputDataError(
            f"not on its image's grid (origin {_origin(other)}, pixel {other.grid[0]:g}; "
            f"the image's {_origin(image)}, pixel {image.grid[0]:g})",
            other.path,
            _onto_grid_hint("resample", other, image, label),
        )


def _onto_grid_hint(verb: str, other: Header, image: Header, label: bool) -> str:
    """The command that puts `other` on `image`'s grid: rio's (rasterio ships it, so it is
    there wherever specdm is), by folder and name, as a mask and its image share a name. A
    mask's pixels the warp cannot cover are unlabelled (255), not a class code 0."""
    moved, target = (f"{h.path.parent.name}/{h.path.name}" for h in (other, image))
    unlabelled = " --src-nodata 255 --dst-nodata 255" if label else ""
    return (
        f"{verb} it onto {target}'s grid: rio warp {moved} OUT --like {target}{unlabelled} "
        "(nearest neighbour, so values stay as they are), then put OUT in its place"
    )


def _origin(header: Header) -> str:
    assert header.grid is not None
    return f"{header.grid[2]:.2f}, {header.grid[5]:.2f}"


def _same_bands(expected: Header, found: Header) -> Header:
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
    _same_band_order(expected, found)
    return expected


def _same_band_order(expected: Header, found: Header) -> None:
    """Files that name the same bands must list them in one order: gdalbuildvrt over files
    sorted by name puts B8A after B12, and such a file's pixels would be stored under the first
    file's band names. Names that differ otherwise (a scene id in each) are not compared."""
    if found.names == expected.names or sorted(found.names) != sorted(expected.names):
        return
    if not all(expected.names):
        return  # unnamed bands: nothing says which is which
    pairs = zip(expected.names, found.names, strict=True)
    band = next(i for i, (a, b) in enumerate(pairs) if a != b)
    raise InputDataError(
        f"band {band + 1} is {found.names[band]!r}, {expected.path.name}'s band {band + 1} is "
        f"{expected.names[band]!r}: the files list their bands in other orders",
        found.path,
        "write every file's bands in one order (e.g. gdal_translate -b 1 -b 3 -b 2)",
    )


def check_all(headers: dict[str, Header]) -> dict[str, str | None]:
    """Each stem's CRS (None where not georeferenced), after checking bands agree. Tiles may lie
    in several CRSs (Sentinel-2 tiles of two UTM zones); files with a CRS and without may not mix."""
    first = next(iter(headers.values()))
    for header in headers.values():
        _same_bands(first, header)
        if (header.crs is None) != (first.crs is None):
            raise InputDataError(
                f"CRS {shown_crs(header.crs)} differs from {first.path.name}'s {shown_crs(first.crs)}",
                header.path,
                "georeference every file, or none (e.g. gdal_translate -a_srs)",
            )
    return one_spelling({stem: header.crs for stem, header in headers.items()})


def output_dtype(dtype: str, path: Path, scaled: bool = False) -> str:
    """The store's image dtype: the files' own, float32 for float64 or for values a scale or
    offset turns into physical units (e.g. reflectance = DN x 0.0001 - 0.1)."""
    kind = np.dtype(dtype).kind
    if kind not in "uif":
        raise InputDataError(
            f"unsupported image data type {dtype}", path, "convert to an integer or float type"
        )
    # float64 carries no information reflectance needs and doubles the store.
    return "float32" if dtype == "float64" or scaled else dtype
