"""Train/val/test of a GeoTIFF folder, by source file: a splits CSV or seeded fractions."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import Manifest
from specdm_cli.sources.base import PrepareOptions, read_text_input
from specdm_cli.sources.geotiff.layout import EXTENSIONS, pairing_name, split_of_stem

_SPLITS = ("train", "val", "test")


def assign_splits(
    stems: list[str],
    options: PrepareOptions,
    recorded: tuple[dict[str, str], str] | None = None,
) -> tuple[dict[str, str], str]:
    """Split per source file (never per patch: overlapping patches would leak across splits):
    a splits file, else splits the data records (`recorded`: each stem's split and where it is
    recorded: an export's manifest, split folders), else seeded fractions."""
    if options.splits_file is not None:
        return _read_splits_file(options.splits_file, stems), str(options.splits_file)
    if recorded is not None:
        return recorded
    val, test = options.val_fraction, options.test_fraction  # checked by PrepareOptions
    n_test = min(_share(test, len(stems)), max(len(stems) - 1, 0))
    n_val = min(_share(val, len(stems)), max(len(stems) - 1 - n_test, 0))
    order = np.random.default_rng(options.seed).permutation(len(stems))
    split_of = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(stems) - n_test - n_val)
    splits = {stems[int(i)]: split_of[rank] for rank, i in enumerate(order)}
    return splits, f"fractions val={val} test={test} seed={options.seed}"


def recorded_splits(
    manifest: Manifest | None, stems: list[str]
) -> tuple[dict[str, str], str] | None:
    """The splits the data records, and where: a specdm GeoTIFF export's manifest (when it
    covers every stem: files may have been added or renamed since), or split folders
    (`images/train/`) when every file lies in one; None otherwise."""
    folders = {stem: split_of_stem(stem) for stem in stems}
    if stems and all(folders.values()):
        return {stem: str(split) for stem, split in folders.items()}, "split folders"
    if manifest is None or not manifest.files:
        return None
    recorded = {Path(next(iter(s.files.values()))).stem: s.split for s in manifest.files}
    if not set(stems) <= set(recorded):
        return None
    splits = {stem: recorded[stem] for stem in stems}
    return splits, "manifest.json (a specdm export's own splits)"


def share_notes(splits: dict[str, str], options: PrepareOptions) -> list[str]:
    """A warning for each split that takes far more of the files than asked: with few files a
    split takes whole files (2 files and --val-fraction 0.1 make half of them val). One file
    stays train, with no note: that a lone scene makes no val split is no surprise."""
    if options.splits_file is not None or not splits:
        return []
    notes = []
    for split, asked in (("val", options.val_fraction), ("test", options.test_fraction)):
        got = sum(1 for value in splits.values() if value == split)
        share = got / len(splits)
        if asked > 0 and share > 2 * asked:
            notes.append(
                f"warning: {split} is {got} of {len(splits)} source files ({share:.0%}, asked "
                f"{asked:g}): splits take whole files; --splits FILE.csv chooses them"
            )
    return notes


def _share(fraction: float, count: int) -> int:
    # At least one file for a requested split (a val split of 0 files is no val split).
    return max(1, math.floor(fraction * count + 0.5)) if fraction > 0 else 0


def _file_stem(cell: str, known: set[str]) -> str:
    """A splits file's stem as pairing names files: a path (`images/tile_00.tif`, `./tile_00`,
    `images\\tile_00.tif` from Windows) or a file name names the same tile as `tile_00`, in
    either Unicode form; a tile of a split folder keeps its folder (`train/tile_00`)."""
    parts = [pairing_name(part) for part in re.split(r"[/\\]", cell.strip())]
    name = parts[-1]
    name = name.rsplit(".", 1)[0] if name.lower().endswith(EXTENSIONS) else name
    in_folder = f"{parts[-2]}/{name}" if len(parts) > 1 else None
    return in_folder if in_folder in known else name


def _read_splits_file(path: Path, stems: list[str]) -> dict[str, str]:
    text = read_text_input(path)
    try:
        table = [row for row in csv.reader(text.splitlines()) if any(c.strip() for c in row)]
    except csv.Error as exc:
        raise InputDataError(f"unreadable splits file ({exc})", path, "check the path") from None
    rows, first_line = _split_rows(table, path)
    known = set(stems)
    splits: dict[str, str] = {}
    for line, (cell, split) in enumerate(rows, start=first_line):
        stem = _file_stem(cell, known)
        if split not in _SPLITS:
            raise InputDataError(f"line {line}: split {split!r} is not train, val or test", path)
        if stem not in known:
            raise InputDataError(
                f"line {line}: no image has the stem {stem!r}",
                path,
                f"write each file's name without folder or extension, e.g. {stems[0]!r}",
            )
        if splits.setdefault(stem, split) != split:
            raise InputDataError(f"line {line}: {stem!r} is listed twice", path, "keep one row")
    missing = [s for s in stems if s not in splits]
    if missing:
        raise InputDataError(
            f"{len(missing)} file(s) have no split, e.g. {missing[0]!r}", path, "add them"
        )
    return splits


def _split_rows(table: list[list[str]], path: Path) -> tuple[list[tuple[str, str]], int]:
    """Each row's (stem, split) and the line number of the first: after a `stem,split` header
    (columns in any order), or from line 1 when the file has no header, which a first row whose
    second field is a split name (`tile_00,train`) shows; a header never reads so."""
    head = [cell.strip() for cell in table[0]] if table else []
    if len(head) >= 2 and head[1] in _SPLITS:
        return [(row[0], row[1].strip() if len(row) > 1 else "") for row in table], 1
    if not {"stem", "split"} <= set(head):
        raise InputDataError(
            "splits file needs a header line stem,split or rows stem,train|val|test",
            path,
            "start the file with the line `stem,split`, then one row per file: tile_00,train",
        )
    at_stem, at_split = head.index("stem"), head.index("split")
    return [(_cell(row, at_stem), _cell(row, at_split).strip()) for row in table[1:]], 2


def _cell(row: list[str], at: int) -> str:
    return row[at] if at < len(row) else ""
