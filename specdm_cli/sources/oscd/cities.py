"""OSCD cities: which the download lists and holds, which the user chose, and their splits."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.sources.base import LeftOut, PrepareOptions
from specdm_cli.sources.oscd.archive import (
    FIX_ARCHIVE,
    IMAGES,
    LABELS,
    Tree,
    labels_merged,
    read_text,
    zip_beside,
)
from specdm_cli.sources.oscd.layout import label_rel

CityList = dict[str, list[str]]  # original split (train, test) -> city names
# Val far above the asked fraction: more than twice it and more than 5 points above it.
_VAL_SHARE_RATIO, _VAL_SHARE_MARGIN = 2.0, 0.05


def list_cities(images: Tree, labels: dict[str, Tree | None]) -> CityList:
    """Cities per original split: Images/<split>.txt, else the label folder's sub-folders."""
    listed: CityList = {}
    if labels_merged(images, labels) and not any(images.has(f"{s}.txt") for s in labels):
        # Every city folder is also a label folder: only the lists tell train from test.
        raise InputDataError(
            "change maps inside the city folders, but no train.txt or test.txt to split them",
            images.where("train.txt"),
            "restore train.txt and test.txt from the OSCD Images archive",
        )
    for split, tree in labels.items():
        txt = f"{split}.txt"
        if images.has(txt):
            text = read_text(images, txt)
            listed[split] = list(dict.fromkeys(n for n in re.split(r"[,\s]+", text) if n))
        elif tree is not None and tree is not images:
            # torchgeo's fixture has no txt files; its cities are the label sub-folders.
            listed[split] = [n for n in tree.subdirs() if not n.startswith((".", "__"))]
        else:
            listed[split] = []
    both = sorted(set(listed["train"]) & set(listed["test"]))
    if both:
        raise InputDataError(
            f"cities listed as both train and test: {both}",
            images.where("test.txt"),
            "list each city in only one of train.txt and test.txt",
        )
    if not listed["train"] and not listed["test"]:
        raise InputDataError("no OSCD cities found", images.where("train.txt"), FIX_ARCHIVE)
    return listed


def choose_cities(listed: CityList, chosen: tuple[str, ...] | None, images: Tree) -> CityList:
    """Only the cities of --cities (each keeps its original split); all when not given."""
    if chosen is None:
        return listed
    known = [name for names in listed.values() for name in names]
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise InputDataError(
            f"--cities names no listed city: {', '.join(unknown) or 'none given'}",
            images.where("train.txt"),
            f"choose among {', '.join(known)}",
        )
    return {split: [n for n in names if n in chosen] for split, names in listed.items()}


def usable_cities(
    root: Path, images: Tree, labels: dict[str, Tree | None], listed: CityList, chosen: bool
) -> tuple[CityList, list[LeftOut]]:
    """The cities a (partial) download can prepare, and the test cities it leaves out.

    Listed cities without images are one error naming all of them. Test cities without a
    change map are left out with one warning, unless --cities asked for them; train cities
    without one are an error (a store without them would silently lose training data).
    """
    _require_images(root, images, listed)
    usable: CityList = {}
    left_out: list[LeftOut] = []
    for split, names in listed.items():
        tree = labels[split]
        unlabelled = [n for n in names if tree is None or label_rel(tree, n) is None]
        usable[split] = [n for n in names if n not in unlabelled]
        if not unlabelled:
            continue
        if split == "test" and not chosen:
            left_out.append(_left_out_test(root, images, tree, unlabelled))
            continue
        raise _unlabelled_train(root, images, tree, split, unlabelled)
    if not any(usable.values()):
        raise InputDataError("no OSCD city has a change map", root, FIX_ARCHIVE)
    return usable, left_out


def _own_labels(images: Tree, tree: Tree | None) -> bool:
    """Whether the split's labels are a labels archive of their own (not absent or merged)."""
    return tree is not None and tree is not images


def _left_out_test(root: Path, images: Tree, tree: Tree | None, names: list[str]) -> LeftOut:
    """Test cities without a change map: the Test Labels archive is absent, or lacks them."""
    stem = LABELS["test"]
    archive = [root / stem, root / f"{stem}.zip"]
    if _own_labels(images, tree):
        assert tree is not None
        reason = f"no cm/cm.png in '{stem}'"
        fix = f"re-extract their cm/ folders from '{stem}'"
        maps = [tree.where(f"{n}/cm/{f}") for n in names for f in ("cm.png", f"{n}-cm.tif")]
        # A zip's members are no paths on disk: only an extracted folder's maps are watched.
        restored_by = maps if tree.where("").is_dir() else []
    else:
        reason = f"no '{stem}' folder or .zip in RAW"
        fix = f"add '{stem}' (or its .zip)"
        restored_by = [path for path in archive if not path.exists()]
    return LeftOut(
        part=f"test cities {', '.join(names)}",
        reason=reason,
        warning=f"warning: skipping {len(names)} test cities without a change map "
        f"({', '.join(names)}): {fix} to prepare them",
        restored_by=tuple(str(path) for path in restored_by),
    )


def _unlabelled_train(
    root: Path, images: Tree, tree: Tree | None, split: str, names: list[str]
) -> InputDataError:
    """Train cities without a change map: an error (a store without them loses training data)
    whose hint fits what RAW holds."""
    stem = LABELS[split]
    message = f"{split} cities without a change map (cm/cm.png): {', '.join(names)}"
    if not _own_labels(images, tree):
        where = root / stem if tree is None else images.where(f"{names[0]}/cm")
        fix = f"add '{stem}' (or its .zip) to RAW, or choose others with --cities"
        return InputDataError(message, where, fix)
    assert tree is not None
    beside = zip_beside(root, stem, tree)
    fix = (
        _partial_folder_fix(tree, beside)
        if beside is not None
        else f"re-extract their cm/ folders from '{stem}' (or re-download it), or choose "
        "others with --cities"
    )
    return InputDataError(message, tree.where(f"{names[0]}/cm"), fix)


def _partial_folder_fix(tree: Tree, beside: Path) -> str:
    """An extracted folder that lacks files beside its whole zip: an interrupted unzip."""
    return (
        f"the folder {tree.where('')} looks like an interrupted extraction of {beside.name} "
        "beside it, and the folder is read first: move the folder away to read the zip, or "
        "extract the zip again in full"
    )


def _require_images(root: Path, images: Tree, listed: CityList) -> None:
    """One error naming every listed city whose image folder the download lacks."""
    names = [name for split_names in listed.values() for name in split_names]
    absent = [name for name in names if not images.has_dir(name)]
    if not absent:
        return
    present = [name for name in names if name not in absent]
    beside = zip_beside(root, IMAGES, images)
    by_lower = {folder.lower(): folder for folder in images.subdirs()}
    renames = [f"{by_lower[n.lower()]}/ to {n}/" for n in absent if n.lower() in by_lower]
    hint = (
        f"the folders are named in another case than the city list: rename {', '.join(renames)}"
        if renames
        else _partial_folder_fix(images, beside)
        if beside is not None
        else f"to prepare the cities you have, pass --cities {','.join(present)}"
        if present
        else "extract the whole Images archive"
    )
    raise InputDataError(
        f"{len(absent)} listed cities have no image folder: {', '.join(absent)}",
        images.where(absent[0]),
        hint,
    )


def assign_splits(listed: CityList, options: PrepareOptions) -> dict[str, str]:
    """Each city's split; val takes whole train cities, so no scene is in two splits."""
    train = sorted(listed["train"])  # sorted: the choice must not depend on the txt order
    if options.val_cities is not None:
        val = _val_cities(options.val_cities, train)
    else:
        n_val = 0
        if options.val_fraction > 0 and len(train) >= 2:
            n_val = min(len(train) - 1, max(1, round(options.val_fraction * len(train))))
        chosen = np.random.default_rng(options.seed).permutation(len(train))[:n_val]
        val = {train[int(i)] for i in chosen}
    splits = {name: "test" for name in listed["test"]}
    splits |= {name: "val" if name in val else "train" for name in listed["train"]}
    return splits


def _val_cities(names: tuple[str, ...], train: list[str]) -> set[str]:
    unknown = [name for name in names if name not in train]
    if unknown:  # a value naming what the data lacks: exit 3, as --cities and --bands are
        raise InputDataError(
            f"--val-cities: not a train city: {', '.join(unknown)}",
            hint=f"choose among {', '.join(train)}",
        )
    if set(names) >= set(train):
        raise UsageError("--val-cities takes every train city", hint="leave one for training")
    return set(names)


def val_share_warning(
    patches: dict[str, int], splits: dict[str, str], options: PrepareOptions
) -> str | None:
    """A warning when whole-city val holds far more patches than --val-fraction asked for."""
    if options.val_cities is not None or options.val_fraction <= 0:
        return None
    val = sum(n for name, n in patches.items() if splits[name] == "val")
    train = sum(n for name, n in patches.items() if splits[name] == "train")
    share = val / max(val + train, 1)
    asked = options.val_fraction
    if share <= max(_VAL_SHARE_RATIO * asked, asked + _VAL_SHARE_MARGIN):
        return None
    cities = sorted(name for name, split in splits.items() if split == "val")
    return (
        f"warning: val holds {share:.0%} of the train patches ({', '.join(cities)}: whole "
        f"cities), far above --val-fraction {asked:g}; choose with --val-cities NAME[,NAME] "
        "or pass --val-fraction 0"
    )
