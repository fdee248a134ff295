"""Raster folders: which layout, and which files pair up (their headers: headers.py)."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from rasterio.drivers import raster_driver_extensions

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import (
    GEOTIFF_FOLDERS,
    LABEL_ARRAY,
    Task,
    array_names,
)
from specdm_cli.sources.base import broken_link

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
