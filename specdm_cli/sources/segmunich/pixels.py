"""SegMunich's files: image and label headers and pixels (tifffile, GDAL for compressed copies,
PIL for mmseg PNGs), each fault named as an input error."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.sources.base import (
    Candidate,
    RawSample,
    apply_nodata,
    broken_link,
    label_nodata_mask,
    remap_labels,
)
from specdm_cli.sources.segmunich.layout import NUM_BANDS

# What tifffile raises on truncated or malformed files (TiffFileError is a ValueError; a
# garbled shape tag divides by zero in its series detection).
# tifffile's parser also asserts on some garbled IFDs (reading `series` of a cut file).
_TIFF_ERRORS = (
    ValueError, OSError, struct.error, IndexError, KeyError, EOFError, TypeError, ArithmeticError,
    AssertionError,
)  # fmt: skip
# Without imagecodecs, tifffile reads ZSTD by importing Python 3.14's `compression` module.
_TIFF_ERRORS_OR_CODEC = (*_TIFF_ERRORS, ImportError)
_GDAL_NODATA = 42113  # GDAL's private TIFF tag: the nodata value as ASCII text


def _codec_missing(exc: Exception) -> bool:
    """tifffile could not decode the compression without an optional codec package."""
    return isinstance(exc, ImportError) or "imagecodecs" in str(exc)


def read_shape(path: Path) -> tuple[int, ...]:
    if path.suffix.lower() == ".png":
        return _png_shape(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(int(n) for n in tif.series[0].shape)
    except FileNotFoundError:
        raise _vanished(path) from None
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


def image_hw(shape: tuple[int, ...], path: Path) -> tuple[int, int]:
    """(H, W) of an image shape, HWC (as tifffile writes SegMunich) or CHW."""
    if len(shape) == 3 and shape[-1] == NUM_BANDS:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] == NUM_BANDS:
        return shape[1], shape[2]
    found = min(shape) if len(shape) == 3 else (1 if len(shape) == 2 else None)
    what = f"found {found}" if found is not None else "found an array"
    raise InputDataError(
        f"expected {NUM_BANDS} bands, {what} (array shape {shape})",
        path,
        "SegMunich images hold 10 bands as (H, W, 10) or (10, H, W); replace the file",
    )


def load_sample(
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
    _require_patch(img_path, height, width, NUM_BANDS)
    _require_patch(label_path, height, width, 1)
    image = _read_image(img_path)
    if image.shape[1:] != (height, width):
        raise InputDataError(
            f"image is {image.shape[1]}x{image.shape[2]} but the first image is {height}x{width}",
            img_path,
            "all SegMunich patches must share one size; replace the file",
        )
    raw_label = _read_label(label_path)
    if raw_label.shape != image.shape[1:]:
        raise InputDataError(
            f"label is {raw_label.shape[0]}x{raw_label.shape[1]} but its image is "
            f"{image.shape[1]}x{image.shape[2]}",
            label_path,
            "replace the label with the one matching its image",
        )
    if label_nodata is None:
        tag = _gdal_nodata(label_path)
        # The class table wins over a tag a tool set (as a geotiff classes file does): a tag
        # of 0 never turns every Background pixel into 255.
        label_nodata = None if tag in codes else tag
    label_invalid = label_nodata_mask(raw_label, label_nodata)
    if label_invalid.any():
        wide = raw_label.astype(np.float64 if raw_label.dtype.kind == "f" else np.int64)
        raw_label = np.where(label_invalid, IGNORE_INDEX, wide)
    mask = remap_labels(raw_label, codes, label_path)
    # A raw 255 is SegMunich's ignore value (the official training's): no data, counted as the
    # declared --label-nodata pixels are (they read 255 here too).
    unlabelled = mask == IGNORE_INDEX
    # --nodata replaces the image's tag; NaN is never a value, so --nodata nan adds to it.
    nan_declared = nodata is not None and math.isnan(nodata)
    image_nodata = _gdal_nodata(img_path) if nodata is None or nan_declared else nodata
    invalid, _ = apply_nodata(image, mask, image_nodata, img_path, nan_declared)
    return RawSample(
        candidate.source_id,
        candidate.split,
        {"image": image, "mask": mask},
        nodata_pixels=int((invalid | unlabelled).sum()),
        image_nodata=invalid,
    )


def _gdal_nodata(path: Path) -> float | None:
    """The GDAL_NODATA tag (42113) of a patch re-saved by GDAL, which tifffile's reads ignore;
    None when the file has none (SegMunich's own patches) or is a PNG."""
    if path.suffix.lower() == ".png":
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages.first.tags.get(_GDAL_NODATA)
            return None if tag is None else float(str(tag.value).strip("\x00 "))
    except _TIFF_ERRORS:  # a tag that is no number, or the file gone since it was read: no tag
        return None


def _require_patch(path: Path, height: int, width: int, bands: int) -> None:
    shape = read_shape(path)
    if path.suffix.lower() == ".png" and len(shape) == 3:
        raise InputDataError(
            f"label PNG holds {shape[2]} colour channels, not class indices",
            path,
            "mmseg's ann_dir PNGs hold each pixel's class index (grey or palette); re-export it",
        )
    colour_channels = shape[-1] if len(shape) == 3 and shape[-1] in (3, 4) else 0
    if bands == 1 and colour_channels and shape[:2] == (height, width):
        raise InputDataError(
            f"label TIFF holds {colour_channels} colour channels, not class codes",
            path,
            "SegMunich labels are single-band maps of raw class codes; re-export it as one band",
        )
    if bands == NUM_BANDS:
        image_hw(shape, path)  # a wrong band count told as such, not as a size
    if math.prod(shape) > height * width * bands:
        raise InputDataError(
            f"file holds {'x'.join(map(str, shape))} values, more than a {height}x{width} patch "
            f"of {bands} band(s)",
            path,
            "all SegMunich patches must share one size; replace the file",
        )


def _read_image(path: Path) -> np.ndarray:
    array = _imread(path)
    image_hw(tuple(array.shape), path)
    if array.shape[-1] == NUM_BANDS:
        array = array.transpose(2, 0, 1)
    # A fresh C-order float32 copy: apply_nodata writes into it.
    return np.array(array, dtype=np.float32, order="C")


def _read_label(path: Path) -> np.ndarray:
    try:
        label = _pil_read(path, None) if path.suffix.lower() == ".png" else tifffile.imread(path)
    except FileNotFoundError:
        raise _vanished(path) from None
    except _TIFF_ERRORS_OR_CODEC as exc:
        # The official code reads labels with PIL, so PIL-only encodings (e.g. LZW without
        # imagecodecs) occur; a codec neither has (ZSTD) GDAL decodes; only when these fail
        # too is the file broken.
        decoded = _gdal_read(path) if _codec_missing(exc) else None
        label = decoded if decoded is not None else _pil_read(path, exc)
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
    except _TIFF_ERRORS_OR_CODEC as exc:
        decoded = _gdal_read(path) if _codec_missing(exc) else None
        if decoded is None:
            raise _corrupt(path, exc) from None
        return decoded


def _gdal_read(path: Path) -> np.ndarray | None:
    """A patch re-saved compressed (e.g. by GDAL with LZW), which tifffile decodes only with
    imagecodecs, read through GDAL in tifffile's axis order; None when GDAL sees another shape
    than the TIFF's series (the original encoding is 128 pages, GDAL would read the first)."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    expected = read_shape(path)
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
    reason = reason_of(exc)
    # tifffile decodes LZW, JPEG, ZSTD, ... only with imagecodecs: then the file is fine.
    if _codec_missing(exc):
        return InputDataError(f"cannot decode TIFF ({reason})", path, "pip install imagecodecs")
    return InputDataError(f"corrupt or truncated {kind} ({reason})", path, "re-download the file")


def _vanished(path: Path) -> InputDataError:
    if path.is_symlink():  # listed, as a link is, but its target was never fetched
        return broken_link(path)
    return InputDataError("file disappeared after listing", path, "restore the file and rerun")
