"""SegMunich reader: the SpectralGPT TUM_128, GFM-Bench or DOFA/mmseg tree in, 10-band float32
samples out."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.sources.base import (
    Candidate,
    LeftOut,
    PrepareOptions,
    RawSample,
    SourcePlan,
    SourceSpec,
    refuse_class_nodata,
    require_dir,
    require_whole_read,
)
from specdm_cli.sources.segmunich.layout import (
    BAND_ORDER_SOURCE,
    MMSEG_CLASSES,
    NUM_BANDS,
    SEGMUNICH_BANDS,
    SEGMUNICH_CLASSES,
    SPLIT_ORDER,
    find_root,
    is_mmseg,
    is_tif,
    leave_out_hint,
    mmseg_candidates,
    read_split_lists,
    split_candidates,
    split_folder,
)
from specdm_cli.sources.segmunich.pixels import image_hw, load_sample, read_shape
from specdm_cli.sources.sentinel2 import S2_RGB_BANDS, s2_bands

_READ_THREADS = 4  # `prepare --workers`' default: patches read at once


def read_segmunich(
    raw: Path | None, options: PrepareOptions, progress: Progress | None = None
) -> SourcePlan:
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
    root = find_root(require_dir(raw, "segmunich"))
    if is_mmseg(root):
        layout, classes, candidates, folders = "mmseg", MMSEG_CLASSES, mmseg_candidates(root), {}
    else:
        classes = SEGMUNICH_CLASSES
        layout, split_ids = read_split_lists(root / "dataset")
        folders = {split: split_folder(root, split, split_ids) for split in split_ids}
        candidates = split_candidates(folders, split_ids, root)
    codes = {int(str(c.code)): c.name for c in classes}
    refuse_class_nodata(options.label_nodata, codes, f"SegMunich's labels ({layout} layout)")
    with _leaving_out(layout, root, candidates[0]):
        height, width = image_hw(read_shape(candidates[0].ref[0]), candidates[0].ref[0])
    # Patches are read whole: a float32 copy and its transpose per band, per reader thread.
    require_whole_read(height, width, NUM_BANDS * 4 * 2 * _READ_THREADS, candidates[0].ref[0])
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
    read = functools.partial(
        load_sample, height=height, width=width, nodata=options.nodata,
        label_nodata=options.label_nodata, codes=tuple(codes),
    )  # fmt: skip
    load = functools.partial(_load, read=read, layout=layout, root=root)
    notes = [
        f"split {split!r} is read from {folder.name}/ (no {split}/ folder): the two names "
        "are used for one split"
        for split, folder in folders.items()
        if folder.name != split
    ]
    left_out = _unlisted_folders(root, folders) if layout == "official" else []
    return SourcePlan(spec, candidates, load, warnings=notes, left_out=left_out)


def _load(
    candidate: Candidate, *, read: Callable[[Candidate], RawSample], layout: str, root: Path
) -> RawSample:
    with _leaving_out(layout, root, candidate):
        return read(candidate)


@contextmanager
def _leaving_out(layout: str, root: Path, candidate: Candidate) -> Iterator[None]:
    """A bad file's error also says how to leave its sample out (see leave_out_hint)."""
    try:
        yield
    except InputDataError as exc:
        exc.hint = f"{exc.hint or 'fix the file'}, or {leave_out_hint(layout, root, candidate)}"
        raise


def _unlisted_folders(root: Path, folders: dict[str, Path]) -> list[LeftOut]:
    """A split folder whose list is missing (a partial extract) is left out: say so, as the
    store would otherwise just lack that split (without train.txt, fit-vae refuses it)."""
    read = set(folders.values())
    unlisted = [
        root / s for s in SPLIT_ORDER if (root / s / "img").is_dir() and root / s not in read
    ]
    left_out = []
    for folder in unlisted:
        images = sum(1 for p in (folder / "img").iterdir() if is_tif(p))
        listing = root / "dataset" / f"{folder.name}.txt"
        left_out.append(
            LeftOut(
                part=f"the {images} images of {folder.name}/",
                reason=f"no dataset/{folder.name}.txt lists them",
                warning=f"{folder.name}/ has no dataset/{folder.name}.txt: its {images} images "
                f"are left out (restore {folder.name}.txt from the archive to read them)",
                restored_by=(str(listing),),
            )
        )
    return left_out


def _quiet_logger(name: str) -> None:
    logger = logging.getLogger(name)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
