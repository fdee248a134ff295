"""The OSCD archives: each top folder, extracted or read in place from its zip."""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.sources.base import decode_text, read_text_input

# The archives' stems; each zip holds one top folder of the same name (datasets.md 2.1).
IMAGES = "Onera Satellite Change Detection dataset - Images"
LABELS = {
    "train": "Onera Satellite Change Detection dataset - Train Labels",
    "test": "Onera Satellite Change Detection dataset - Test Labels",
}
FIX_ARCHIVE = "re-extract it from the OSCD archive or re-download the archive"
FIX_ZIP = "re-download the zip (OSCD's zips are read in place)"  # no re-extracting a zip itself


class Tree(Protocol):
    """One OSCD top folder, extracted or inside its zip; `rel` paths are '/'-joined."""

    def where(self, rel: str) -> Path: ...
    def has(self, rel: str) -> bool: ...
    def has_dir(self, rel: str) -> bool: ...
    def subdirs(self) -> list[str]: ...
    def listdir(self, rel: str) -> list[str]: ...
    def source(self, rel: str) -> Path | bytes: ...


@dataclass(frozen=True)
class _DirTree:
    root: Path

    def where(self, rel: str) -> Path:
        return self.root / rel

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def has_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def subdirs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def listdir(self, rel: str) -> list[str]:
        folder = self.root / rel
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def source(self, rel: str) -> Path:
        # A path, not bytes: rasterio then reads headers without reading the pixels.
        return self.root / rel


class _ZipTree:
    """A top folder read in place from its zip; each read opens the zip anew (thread-safe)."""

    def __init__(self, archive: Path, stem: str):
        self.archive = archive
        try:
            with zipfile.ZipFile(archive) as zf:
                listed = zf.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InputDataError(f"corrupt or unreadable zip ({exc})", archive, FIX_ZIP) from None
        # Windows PowerShell 5's Compress-Archive writes `\` between folders, against the zip
        # spec: names are read with `/`, and each member is read by the name it has in the zip.
        self._members = {n.replace("\\", "/"): n for n in listed}
        names = [n for n in self._members if not n.endswith("/")]
        # Tolerate a re-zipped archive without the top folder.
        self.prefix = f"{stem}/" if any(n.startswith(f"{stem}/") for n in names) else ""
        self.files = {n[len(self.prefix) :] for n in names if n.startswith(self.prefix)}

    def where(self, rel: str) -> Path:
        return self.archive / f"{self.prefix}{rel}"

    def has(self, rel: str) -> bool:
        return rel in self.files

    def has_dir(self, rel: str) -> bool:
        return any(n.startswith(f"{rel}/") for n in self.files)

    def subdirs(self) -> list[str]:
        return sorted({n.split("/")[0] for n in self.files if "/" in n})

    def listdir(self, rel: str) -> list[str]:
        inside = [n[len(rel) + 1 :] for n in self.files if n.startswith(f"{rel}/")]
        return sorted(n for n in inside if "/" not in n)

    def source(self, rel: str) -> bytes:
        try:
            with zipfile.ZipFile(self.archive) as zf:
                return zf.read(self._members[f"{self.prefix}{rel}"])
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, KeyError) as exc:
            raise InputDataError(
                f"corrupt zip: cannot read {self.prefix}{rel} ({exc})", self.archive, FIX_ZIP
            ) from None
        except (NotImplementedError, RuntimeError) as exc:
            # Python's zipfile reads neither Deflate64 (Windows' and 7-Zip's choice for large
            # files) nor encrypted members; unzip and 7-Zip read both.
            raise InputDataError(
                f"cannot read {self.prefix}{rel} from the zip ({exc})",
                self.archive,
                "extract the zip (7-Zip, or unzip) and pass the extracted folder",
            ) from None


def fix_of(tree: Tree) -> str:
    """The fix of a bad or missing file of `tree`: re-extract it, or for a zip re-download it."""
    return FIX_ZIP if isinstance(tree, _ZipTree) else FIX_ARCHIVE


def zip_beside(root: Path, stem: str, tree: Tree | None) -> Path | None:
    """The `<stem>.zip` beside the extracted folder `tree` reads instead (an interrupted unzip
    leaves a partial folder, which wins over the zip), or None."""
    beside = root / f"{stem}.zip"
    if tree is None or isinstance(tree, _ZipTree) or not beside.is_file():
        return None
    return beside


def open_trees(root: Path) -> tuple[Tree, dict[str, Tree | None]]:
    """The Images tree and each split's labels tree; labels a download lacks are None.

    SpectralGPT's instructions merge the change maps into the images (`<city>/cm/cm.png` beside
    `imgs_1_rect/`): such a folder, as RAW or as the Images folder in it, is both trees.
    """
    images = _open_tree(root, IMAGES)
    if images is None and _holds_change_maps(_DirTree(root)):
        images = _DirTree(root)
    if images is None:
        raise _missing(root, IMAGES)
    merged = images if _holds_change_maps(images) else None
    # A split without its labels folder takes the maps merged into the images, if any.
    labels = {split: _open_tree(root, stem) or merged for split, stem in LABELS.items()}
    if all(tree is None for tree in labels.values()):
        raise _missing(root, LABELS["train"])
    return images, labels


def labels_merged(images: Tree, labels: dict[str, Tree | None]) -> bool:
    """Whether the change maps lie in the Images tree (SpectralGPT's layout)."""
    return any(tree is images for tree in labels.values())


def _holds_change_maps(tree: Tree) -> bool:
    """A folder of cities with their images and change maps side by side."""
    cities = tree.subdirs()
    return any(tree.has(f"{c}/cm/cm.png") and tree.has_dir(f"{c}/imgs_1_rect") for c in cities)


def _open_tree(root: Path, stem: str) -> Tree | None:
    # An extracted folder wins over its zip, as in torchgeo. Windows' "Extract All" puts the
    # zip's top folder inside a folder of the zip's name: the same name twice.
    found = _folder_or_zip(root, stem)
    if found is None:
        # `unzip X.zip -d images`, or into the Images folder: the top folder one level down.
        deeper = [f for d in _subfolders(root) if (f := _folder_or_zip(d, stem)) is not None]
        if len(deeper) > 1:
            raise InputDataError(
                f"'{stem}' found in several folders: {', '.join(str(f) for f in deeper)}",
                root,
                f"keep one and move it into {root}",
            )
        found = deeper[0] if deeper else None
    if found is None:
        return None
    if found.is_dir():
        nested = found / stem
        return _DirTree(nested if nested.is_dir() else found)
    return _ZipTree(found, stem)


def _folder_or_zip(folder: Path, stem: str) -> Path | None:
    if (folder / stem).is_dir():
        return folder / stem
    if (folder / f"{stem}.zip").is_file():
        return folder / f"{stem}.zip"
    return None


def _subfolders(root: Path) -> list[Path]:
    return sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))
    )


def _missing(root: Path, stem: str) -> InputDataError:
    hint = f"put '{stem}' or '{stem}.zip' in {root} (RAW holds the three OSCD folders or zips)"
    if root.name in (IMAGES, *LABELS.values()):
        hint = f"pass {root.parent}, the folder that holds the three OSCD folders, not one of them"
    return InputDataError("OSCD folder (or its .zip) is missing", root / stem, hint)


def read_text(tree: Tree, rel: str) -> str:
    """A text file of the tree (UTF-8 or UTF-16 with its mark); an unreadable one names it."""
    source = tree.source(rel)
    if isinstance(source, Path):
        return read_text_input(source)
    return decode_text(source, tree.where(rel))


@contextmanager
def open_raster(tree: Tree, rel: str) -> Iterator[Any]:
    """An open rasterio dataset of a file or zip member; failures name the file."""
    source = tree.source(rel)
    try:
        if isinstance(source, Path):
            with rasterio.open(source) as src:
                yield src
        else:
            with MemoryFile(source) as memory, memory.open() as src:
                yield src
    except (RasterioError, OSError) as exc:
        reason = reason_of(exc, rel)
        raise InputDataError(
            f"corrupt or unreadable TIFF ({reason})", tree.where(rel), fix_of(tree)
        ) from None


@contextmanager
def open_png(tree: Tree, rel: str) -> Iterator[Image.Image]:
    """An open PIL image of a file or zip member; failures name the file."""
    source = tree.source(rel)
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
            yield img
    except (
        UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError
    ) as exc:  # fmt: skip
        raise InputDataError(
            f"corrupt or unreadable PNG ({exc})", tree.where(rel), fix_of(tree)
        ) from None
