"""SegMunich reader: the SpectralGPT TUM_128, GFM-Bench or DOFA/mmseg tree in, 10-band float32
samples out."""

from __future__ import annotations

import csv
import functools
import logging
import math
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IGNORE_INDEX, ClassInfo
from specdm_cli.sources.base import (
    Candidate,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    apply_nodata,
    iter_nonempty_lines,
    label_nodata_mask,
    read_text_input,
    remap_labels,
    require_dir,
    require_whole_read,
)
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, S2_TEN_BANDS, s2_bands

# Channel order of the image files, measured on a real patch (datasets.md 1.3): channels 0-3 are
# native 10 m (B02, B03, B04, B08), channels 4-9 are 2x2-upsampled 20 m bands, and the spectrum
# (NIR jump at ch3, rising red edge, SWIR1 > SWIR2) fits only this order. GFM-Bench's B1..B4 list
# and the order confirmed in SpectralGPT issue #31 both contradict the file.
SEGMUNICH_BANDS: tuple[str, ...] = S2_TEN_BANDS
BAND_ORDER_SOURCE = (
    "SegMunich file order B02,B03,B04,B08 (10 m) then B05,B06,B07,B8A,B11,B12 (20 m, 2x2 "
    "upsampled), inferred from a real patch's block structure and spectrum; GFM-Bench's "
    "B1-B4 order and SpectralGPT issue #31 disagree"
)

# Names from DOFA's METAINFO, raw codes from the remap every loader applies (datasets.md 1.4);
# colours follow the CORINE land-cover legend of each class's level-2 code.
_CLASS_TABLE: list[tuple[str, tuple[int, int, int], int]] = [
    ("Background", (0, 0, 0), 0),
    ("Arable land", (255, 255, 168), 21),
    ("Permanent crops", (242, 166, 77), 22),
    ("Pastures", (230, 230, 77), 23),
    ("Forests", (0, 166, 0), 31),
    ("Surface water", (0, 204, 242), 5),
    ("Shrub", (166, 230, 77), 32),
    ("Open spaces", (204, 204, 204), 33),
    ("Wetlands", (166, 166, 255), 41),
    ("Mine dump", (166, 0, 204), 13),
    ("Artificial vegetation", (255, 166, 255), 14),
    ("Urban fabric", (230, 0, 77), 11),
    ("Buildings", (204, 77, 242), 12),
]
SEGMUNICH_CLASSES: list[ClassInfo] = [
    ClassInfo(index=i, name=name, colour=colour, code=code)
    for i, (name, colour, code) in enumerate(_CLASS_TABLE)
]
# DOFA's mmseg copy (the earthflow archive, datasets.md 1.6): PNG labels already remapped to
# the class indices, so a file's code is its index.
MMSEG_CLASSES: list[ClassInfo] = [c.model_copy(update={"code": c.index}) for c in SEGMUNICH_CLASSES]
_MMSEG_FOLDERS = ("img_dir", "ann_dir")
SPLIT_ORDER = ("train", "val", "test")
_NUM_BANDS = len(SEGMUNICH_BANDS)
_READ_THREADS = 4  # `prepare --workers`' default: patches read at once
# What tifffile raises on truncated or malformed files (TiffFileError is a ValueError; a
# garbled shape tag divides by zero in its series detection).
# tifffile's parser also asserts on some garbled IFDs (reading `series` of a cut file).
_TIFF_ERRORS = (
    ValueError, OSError, struct.error, IndexError, KeyError, EOFError, TypeError, ArithmeticError,
    AssertionError,
)  # fmt: skip

SplitIds = dict[str, list[str]]


def read_segmunich(raw: Path | None, options: PrepareOptions) -> SourcePlan:
    """Open a SegMunich tree: find the root, list every sample and check its files exist.

    Accepts the official TUM_128 layout (`dataset/<split>.txt`), GFM-Bench's
    (`dataset/metadata.csv` with columns id, source) and DOFA's mmseg copy (`img_dir/<split>/`
    TIFFs, `ann_dir/<split>/` PNG class indices), as the given folder or one folder inside it
    (e.g. `TUM_128/`, `SegMunich/`). Only the first image's header is read here.

    Args:
        raw: the folder holding `dataset/`, or holding one folder that does.
        options: `nodata` and `label_nodata` (SegMunich itself declares neither).

    Returns:
        The plan; its `load` is thread-safe and returns `image` (10, H, W) float32 reflectance
        x 10000 and `mask` (H, W) uint8 class indices. `spec.details["label_codes"]` maps each
        raw code (as a string) to its class index (mmseg labels hold the indices themselves).

    Raises:
        InputDataError: missing folder, split list or file; unreadable first image.
    """
    # tifffile logs its own warnings for broken files; the InputDataError line says it once.
    _quiet_logger("tifffile")
    root = _find_root(require_dir(raw, "segmunich"))
    if _is_mmseg(root):
        layout, classes, candidates, folders = "mmseg", MMSEG_CLASSES, _mmseg_candidates(root), {}
    else:
        classes = SEGMUNICH_CLASSES
        layout, split_ids = _read_split_lists(root / "dataset")
        folders = {split: _split_folder(root, split, split_ids) for split in split_ids}
        candidates = _candidates(folders, split_ids, root)
    height, width = _image_hw(_read_shape(candidates[0].ref[0]), candidates[0].ref[0])
    # Patches are read whole: a float32 copy and its transpose per band, per reader thread.
    require_whole_read(height, width, _NUM_BANDS * 4 * 2 * _READ_THREADS, candidates[0].ref[0])
    spec = SourceSpec(
        dataset="segmunich",
        task="ss",
        bands=s2_bands(SEGMUNICH_BANDS),
        classes=list(classes),
        dtype="float32",
        height=height,
        width=width,
        crs=None,
        rgb_bands=list(S2_RGB_BANDS),
        band_order_source=BAND_ORDER_SOURCE,
        details={
            "layout": layout,
            "label_codes": {str(c.code): c.index for c in classes},
            "splits": [s for s in SPLIT_ORDER if any(c.split == s for c in candidates)],
        },
    )
    load = functools.partial(
        _load, height=height, width=width, nodata=options.nodata,
        label_nodata=options.label_nodata, codes=tuple(int(str(c.code)) for c in classes),
    )  # fmt: skip
    notes = [
        f"split {split!r} is read from {folder.name}/ (no {split}/ folder): the two names "
        "are used for one split"
        for split, folder in folders.items()
        if folder.name != split
    ]
    return SourcePlan(spec=spec, candidates=candidates, load=load, warnings=notes)


def _quiet_logger(name: str) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def _is_mmseg(tree: Path) -> bool:
    return all((tree / name).is_dir() for name in _MMSEG_FOLDERS)


def _is_tree(folder: Path) -> bool:
    return (folder / "dataset").is_dir() or _is_mmseg(folder)


def _find_root(raw: Path) -> Path:
    if _is_tree(raw):
        return raw
    inner = [d for d in sorted(raw.iterdir()) if d.is_dir() and _is_tree(d)]
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        names = ", ".join(d.name for d in inner)
        raise InputDataError(
            f"several SegMunich trees found ({names})", raw, "pass the one to prepare"
        )
    archives = sorted(p.name for p in raw.glob("*.zip"))
    hint = (
        f"extract {archives[0]} here first"
        if archives
        else "pass the folder holding dataset/<split>.txt (or dataset/metadata.csv), "
        "<split>/img and <split>/label (or mmseg's img_dir/ and ann_dir/), or the folder "
        "containing TUM_128/"
    )
    raise InputDataError("no SegMunich dataset/ folder", raw / "dataset", hint)


def _read_split_lists(dataset: Path) -> tuple[str, SplitIds]:
    lists = {p.stem: p for p in dataset.glob("*.txt") if p.stem in SPLIT_ORDER}
    if lists:
        return "official", {
            s: _unique_ids([_sample_id(line) for line in iter_nonempty_lines(p)], p)
            for s, p in lists.items()
        }
    if (dataset / "metadata.csv").is_file():
        return "gfm-bench", _read_metadata_csv(dataset / "metadata.csv")
    raise InputDataError(
        "no split list: expected train.txt, val.txt or test.txt, or metadata.csv",
        dataset,
        "extract the whole SegMunich archive (its dataset/ folder lists the samples)",
    )


def _sample_id(line: str) -> str:
    """A split-file line as a sample id: the official lists omit `.tif`, re-made ones often not."""
    for suffix in (".tif", ".tiff"):
        if line.lower().endswith(suffix):
            return line[: -len(suffix)]
    return line


def _read_metadata_csv(path: Path) -> SplitIds:
    reader = csv.DictReader(read_text_input(path).splitlines())
    rows = list(reader)
    columns = set(reader.fieldnames or [])
    if not {"id", "source"} <= columns:
        raise InputDataError(
            f"metadata.csv needs columns id and source, found {sorted(columns)}",
            path,
            "restore the file from the GFM-Bench archive",
        )
    split_ids: SplitIds = {}
    for line, row in enumerate(rows, start=2):
        split = (row["source"] or "").strip()
        if split not in SPLIT_ORDER:
            raise InputDataError(
                f"line {line}: source {split!r} is not one of {list(SPLIT_ORDER)}", path, "fix it"
            )
        split_ids.setdefault(split, []).append((row["id"] or "").strip())
    return {s: _unique_ids([i for i in ids if i], path) for s, ids in split_ids.items()}


def _unique_ids(ids: list[str], path: Path) -> list[str]:
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise InputDataError(
            f"sample id(s) listed twice: {repeated[:5]}", path, "remove the duplicate lines"
        )
    return ids


# The official code reads `test`, the archive as third-party tools unpack it has `val`
# (datasets.md 1.2): a list of one name may come with the folder of the other.
_SPLIT_SYNONYMS = {"val": "test", "test": "val"}


def _split_folder(root: Path, split: str, split_ids: SplitIds) -> Path:
    """`root/split`, or the synonym's folder when only that exists and has no list of its own."""
    other = _SPLIT_SYNONYMS.get(split)
    if (root / split).is_dir() or other is None or other in split_ids:
        return root / split
    return root / other if (root / other).is_dir() else root / split


def _candidates(folders: dict[str, Path], split_ids: SplitIds, root: Path) -> list[Candidate]:
    candidates: list[Candidate] = []
    for split in SPLIT_ORDER:
        ids = split_ids.get(split, [])
        if not ids:
            continue
        img_dir, label_dir = folders[split] / "img", folders[split] / "label"
        _require_files(img_dir, ids, split)
        _require_files(label_dir, ids, split)
        candidates += [
            Candidate(f"{split}/{i}", split, (img_dir / f"{i}.tif", label_dir / f"{i}.tif"))
            for i in ids
        ]
    if not candidates:
        raise InputDataError(
            "the split lists name no samples", root / "dataset", "restore the split lists"
        )
    return candidates


def _mmseg_candidates(root: Path) -> list[Candidate]:
    """Every `img_dir/<split>/<id>.tif` with its `ann_dir/<split>/<id>.png`; the splits are the
    folders there (mmseg's `train` and `val`)."""
    images, labels = (root / name for name in _MMSEG_FOLDERS)
    candidates: list[Candidate] = []
    for split in SPLIT_ORDER:
        if not (images / split).is_dir():
            continue
        ids = sorted(p.stem for p in (images / split).glob("*.tif"))
        _require_files(labels / split, ids, split, suffix=".png")
        candidates += [
            Candidate(
                f"{split}/{i}", split, (images / split / f"{i}.tif", labels / split / f"{i}.png")
            )
            for i in ids
        ]
    if not candidates:
        found = sorted(p.name for p in images.iterdir() if p.is_dir())
        raise InputDataError(
            f"no .tif images in img_dir/{{train,val,test}} (folders there: {found})",
            images,
            "extract the whole archive: mmseg's img_dir/<split>/<id>.tif and ann_dir/<split>/<id>.png",
        )
    return candidates


def _require_files(folder: Path, ids: Sequence[str], split: str, suffix: str = ".tif") -> None:
    # One directory listing per folder instead of a stat per file: SegMunich has ~7,000 files.
    try:
        present = {p.name for p in folder.iterdir()}
    except OSError:
        raise InputDataError(
            f"folder missing for split {split!r}",
            folder,
            "extract the whole SegMunich archive",
        ) from None
    missing = [i for i in ids if f"{i}{suffix}" not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputDataError(
            f"file listed in split {split!r} is missing{more}",
            folder / f"{missing[0]}{suffix}",
            f"restore the file or remove its id from the {split} split list"
            if suffix == ".tif"
            else "restore the label, or remove its image",
        )


def _read_shape(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() == ".png":
        return _png_shape(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(n) for n in tif.series[0].shape)
    except _TIFF_ERRORS as exc:
        raise _corrupt(path, exc) from None


def _png_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return (
                img.height,
                img.width,
                *([len(img.getbands())] if len(img.getbands()) > 1 else []),
            )
    except FileNotFoundError:
        raise _vanished(path) from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _corrupt(path, exc, "PNG") from None


def _image_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(H, W) of an image shape, HWC (as tifffile writes SegMunich) or CHW."""
    if len(shape) == 3 and shape[-1] == _NUM_BANDS:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] == _NUM_BANDS:
        return shape[1], shape[2]
    found = min(shape) if len(shape) == 3 else (1 if len(shape) == 2 else None)
    what = f"found {found}" if found is not None else "found an array"
    raise InputDataError(
        f"expected {_NUM_BANDS} bands, {what} (array shape {shape})",
        path,
        "SegMunich images hold 10 bands as (H, W, 10) or (10, H, W); remove or replace the file",
    )


def _load(
    candidate: Candidate,
    *,
    height: int,
    width: int,
    nodata: float | None,
    label_nodata: float | None,
    codes: Sequence[int],
) -> RawSample:
    img_path, label_path = candidate.ref
    # Checked from the headers before reading: a file is read whole, whatever size it claims.
    _require_patch(img_path, height, width, _NUM_BANDS)
    _require_patch(label_path, height, width, 1)
    image = _read_image(img_path)
    if image.shape[1:] != (height, width):
        raise InputDataError(
            f"image is {image.shape[1]}x{image.shape[2]} but the first image is {height}x{width}",
            img_path,
            "all SegMunich patches must share one size; remove or replace the file",
        )
    raw_label = _read_label(label_path)
    if raw_label.shape != image.shape[1:]:
        raise InputDataError(
            f"label is {raw_label.shape[0]}x{raw_label.shape[1]} but its image is "
            f"{image.shape[1]}x{image.shape[2]}",
            label_path,
            "replace the label with the one matching its image",
        )
    label_invalid = label_nodata_mask(raw_label, label_nodata)
    if label_invalid.any():
        wide = raw_label.astype(np.float64 if raw_label.dtype.kind == "f" else np.int64)
        raw_label = np.where(label_invalid, IGNORE_INDEX, wide)
    mask = remap_labels(raw_label, codes, label_path)
    invalid, _ = apply_nodata(image, mask, nodata, img_path)
    return RawSample(
        candidate.source_id,
        candidate.split,
        {"image": image, "mask": mask},
        nodata_pixels=int((invalid | label_invalid).sum()),
        image_nodata=invalid,
    )


def _require_patch(path: Path, height: int, width: int, bands: int) -> None:
    shape = _read_shape(path)
    if path.suffix.lower() == ".png" and len(shape) == 3:
        raise InputDataError(
            f"label PNG holds {shape[2]} colour channels, not class indices",
            path,
            "mmseg's ann_dir PNGs hold each pixel's class index (grey or palette); re-export it",
        )
    if math.prod(shape) > height * width * bands:
        raise InputDataError(
            f"file holds {'x'.join(map(str, shape))} values, more than a {height}x{width} patch "
            f"of {bands} band(s)",
            path,
            "all SegMunich patches must share one size; remove or replace the file",
        )


def _read_image(path: Path) -> np.ndarray:
    array = _imread(path)
    _image_hw(tuple(array.shape), path)
    if array.shape[-1] == _NUM_BANDS:
        array = array.transpose(2, 0, 1)
    # A fresh C-order float32 copy: apply_nodata writes into it.
    return np.array(array, dtype=np.float32, order="C")


def _read_label(path: Path) -> np.ndarray:
    try:
        label = _pil_read(path, None) if path.suffix.lower() == ".png" else tifffile.imread(path)
    except FileNotFoundError:
        raise _vanished(path) from None
    except _TIFF_ERRORS as exc:
        # The official code reads labels with PIL, so PIL-only encodings (e.g. LZW without
        # imagecodecs) occur; only when PIL fails too is the file broken.
        label = _pil_read(path, exc)
    label = np.squeeze(label)
    if label.ndim != 2:
        raise InputDataError(
            f"label has shape {label.shape}, expected one band (H, W)",
            path,
            "SegMunich labels are single-band maps of raw class codes",
        )
    return label


def _pil_read(path: Path, tiff_exc: Exception | None) -> np.ndarray:
    """A label through PIL: mmseg's PNGs, or a TIFF tifffile could not read (`tiff_exc`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img)
    except FileNotFoundError:
        raise _vanished(path) from None
    except (UnidentifiedImageError, Image.DecompressionBombError, *_TIFF_ERRORS) as exc:
        raise (
            _corrupt(path, exc, "PNG") if tiff_exc is None else _corrupt(path, tiff_exc)
        ) from None


def _imread(path: Path) -> np.ndarray:
    try:
        return np.asarray(tifffile.imread(path))
    except FileNotFoundError:
        raise _vanished(path) from None
    except _TIFF_ERRORS as exc:
        decoded = _gdal_read(path) if "imagecodecs" in str(exc) else None
        if decoded is None:
            raise _corrupt(path, exc) from None
        return decoded


def _gdal_read(path: Path) -> np.ndarray | None:
    """A patch re-saved compressed (e.g. by GDAL with LZW), which tifffile decodes only with
    imagecodecs, read through GDAL in tifffile's axis order; None when GDAL sees another shape
    than the TIFF's series (the original encoding is 128 pages, GDAL would read the first)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    expected = _read_shape(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                bands = np.asarray(src.read())
    except (RasterioError, OSError):  # GDAL cannot read it either: the TIFF error stands
        return None
    for candidate in (bands, bands.transpose(1, 2, 0), bands[0]):
        if candidate.shape == expected:
            return candidate
    return None


def _corrupt(path: Path, exc: Exception, kind: str = "TIFF") -> InputDataError:
    reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    # tifffile decodes LZW, JPEG, ... only with imagecodecs: then the file is fine.
    if "imagecodecs" in reason:
        return InputDataError(f"cannot decode TIFF ({reason})", path, "pip install imagecodecs")
    return InputDataError(
        f"corrupt or truncated {kind} ({reason})", path, "re-download or remove the file"
    )


def _vanished(path: Path) -> InputDataError:
    return InputDataError("file disappeared after listing", path, "restore the file and rerun")
