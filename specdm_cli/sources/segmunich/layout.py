"""SegMunich's trees (SpectralGPT's TUM_128, GFM-Bench, DOFA's mmseg copy): bands, classes,
split lists and the patches they name."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import ClassInfo
from specdm_cli.sources.base import Candidate, iter_nonempty_lines, read_text_input
from specdm_cli.sources.sentinel2 import S2_TEN_BANDS

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


NUM_BANDS = len(SEGMUNICH_BANDS)


SplitIds = dict[str, list[str]]


def is_mmseg(tree: Path) -> bool:
    return all((tree / name).is_dir() for name in _MMSEG_FOLDERS)


def _is_tree(folder: Path) -> bool:
    return (folder / "dataset").is_dir() or is_mmseg(folder)


def find_root(raw: Path) -> Path:
    if _is_tree(raw):
        return raw
    folders = [d for d in sorted(raw.iterdir()) if d.is_dir()]
    inner = [d for d in folders if _is_tree(d)]
    if not inner:  # Windows' "Extract All" of TUM_128.zip makes TUM_128/TUM_128/
        inner = [d / d.name for d in folders if (d / d.name).is_dir() and _is_tree(d / d.name)]
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


def read_split_lists(dataset: Path) -> tuple[str, SplitIds]:
    lists = {p.stem: p for p in dataset.glob("*.txt") if p.stem in SPLIT_ORDER}
    if lists:
        return "official", {
            s: _unique_ids([_sample_id(line, s) for line in iter_nonempty_lines(p)], p)
            for s, p in lists.items()
        }
    if (dataset / "metadata.csv").is_file():
        return "gfm-bench", _read_metadata_csv(dataset / "metadata.csv")
    raise InputDataError(
        "no split list: expected train.txt, val.txt or test.txt, or metadata.csv",
        dataset,
        "extract the whole SegMunich archive (its dataset/ folder lists the samples)",
    )


def _sample_id(line: str, split: str) -> str:
    """A split-file line as a sample id: the official lists omit `.tif`, re-made ones often not,
    and some give the file's path in the split's own folder (`train/img/1.tif` in train.txt).
    A path into another folder is kept whole, so it is reported missing, never read from
    this split's folder."""
    line = line.replace("\\", "/")
    for prefix in (f"{split}/img/", "img/"):
        if line.lower().startswith(prefix):
            line = line[len(prefix) :]
            break
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
            f"metadata.csv needs columns id and source (GFM-Bench's), found {sorted(columns)}",
            path,
            "restore the file from the GFM-Bench archive, or give the splits as "
            "dataset/<split>.txt lists (one id a line), which are read first",
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


def split_folder(root: Path, split: str, split_ids: SplitIds) -> Path:
    """`root/split`, or the synonym's folder when only that exists and has no list of its own."""
    other = _SPLIT_SYNONYMS.get(split)
    if (root / split).is_dir() or other is None or other in split_ids:
        return root / split
    return root / other if (root / other).is_dir() else root / split


def split_candidates(folders: dict[str, Path], split_ids: SplitIds, root: Path) -> list[Candidate]:
    candidates: list[Candidate] = []
    for split in SPLIT_ORDER:
        ids = split_ids.get(split, [])
        if not ids:
            continue
        images = _require_files(folders[split] / "img", ids, split)
        labels = _require_files(folders[split] / "label", ids, split)
        candidates += [
            Candidate(f"{split}/{i}", split, pair)
            for i, pair in zip(ids, zip(images, labels, strict=True), strict=True)
        ]
    if not candidates:
        raise InputDataError(
            "the split lists name no samples", root / "dataset", "restore the split lists"
        )
    return candidates


def mmseg_candidates(root: Path) -> list[Candidate]:
    """Every `img_dir/<split>/<id>.tif` with its `ann_dir/<split>/<id>.png`; the splits are the
    folders there (mmseg's `train` and `val`)."""
    images, labels = (root / name for name in _MMSEG_FOLDERS)
    candidates: list[Candidate] = []
    for split in SPLIT_ORDER:
        if not (images / split).is_dir():
            continue
        # Never a hidden file: macOS leaves ._<id>.tif beside each file it copies.
        tifs = sorted(
            (p for p in (images / split).iterdir() if is_tif(p) and not p.name.startswith(".")),
            key=lambda p: p.stem,
        )
        ids = [p.stem for p in tifs]
        pngs = _require_files(
            labels / split, ids, split, ".png", f"move {images.name}/{split}/ away"
        )
        candidates += [
            Candidate(f"{split}/{i}", split, pair)
            for i, pair in zip(ids, zip(tifs, pngs, strict=True), strict=True)
        ]
    if not candidates:
        found = sorted(p.name for p in images.iterdir() if p.is_dir())
        raise InputDataError(
            f"no .tif images in img_dir/{{train,val,test}} (folders there: {found})",
            images,
            "extract the whole archive: mmseg's img_dir/<split>/<id>.tif and ann_dir/<split>/<id>.png",
        )
    return candidates


def leave_out_hint(layout: str, root: Path, candidate: Candidate) -> str:
    """How to leave a sample out of the raw data: the split lists name the samples (mmseg's
    image files do), so removing a bad file alone makes a rerun say it is missing."""
    split, sample_id = candidate.source_id.split("/", 1)
    lists = root / "dataset"
    if layout == "official":
        return f"leave the sample out: delete its line ({sample_id}) from {lists / split}.txt"
    if layout == "gfm-bench":
        return f"leave the sample out: delete its row (id {sample_id}) from {lists}/metadata.csv"
    return f"leave the sample out: remove its image {candidate.ref[0]}"


def is_tif(path: Path) -> bool:
    """A `.tif` of any case: `1.TIF` is the same file as Windows tools and FAT copies name it."""
    return path.suffix.lower() == ".tif"


# `.tiff` and `.TIF` are the `.tif` a list's id names; the driver that writes each suffix.
_TIF_SPELLINGS = {".tiff": ".tif"}
_DRIVERS = {".tif": "GTiff", ".png": "PNG"}


def _require_files(
    folder: Path, ids: Sequence[str], split: str, suffix: str = ".tif", leave_out: str = ""
) -> list[Path]:
    """The file `<id><suffix>` of each id in `folder`, by its real name (the suffix of any
    case; an exact match first); a missing one is an input error naming it, and a missing
    folder how to `leave_out` its split (a partial extract)."""
    leave_out = leave_out or f"take split {split!r} out of the split lists in dataset/"
    # One directory listing per folder instead of a stat per file: SegMunich has ~7,000 files.
    try:
        listed = sorted(folder.iterdir(), key=lambda p: (p.suffix != p.suffix.lower(), p.name))
    except OSError:
        raise InputDataError(
            f"folder missing for split {split!r}",
            folder,
            f"extract the whole SegMunich archive, or {leave_out} to prepare the other splits",
        ) from None
    present: dict[str, Path] = {}
    for path in listed:
        present.setdefault(
            path.stem + _TIF_SPELLINGS.get(path.suffix.lower(), path.suffix.lower()), path
        )
    missing = [i for i in ids if f"{i}{suffix}" not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        other = next((p for p in listed if p.stem == missing[0] and p.is_file()), None)
        beside = f"; {other.name} is there, in another format than {suffix}" if other else ""
        raise InputDataError(
            f"file listed in split {split!r} is missing{more}{beside}",
            folder / f"{missing[0]}{suffix}",
            f"convert the files to {suffix} (e.g. gdal_translate -of {_DRIVERS[suffix]} "
            f"{other.name} {missing[0]}{suffix})"
            if other is not None
            else f"restore the file or remove its id from the {split} split list"
            if suffix == ".tif"
            else "restore the label, or remove its image",
        )
    return [present[f"{i}{suffix}"] for i in ids]
