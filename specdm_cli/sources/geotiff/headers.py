"""Raster headers of a folder's files: opened once each, checked against each other (sizes,
grids, bands, types) before any pixel is read, and a mask compressed with loss refused."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, reason_of
from specdm_cli.manifest import LABEL_ARRAY, Task, array_names
from specdm_cli.sources.geotiff.crs import crs_name, one_spelling, same_crs, shown_crs, told_apart
from specdm_cli.sources.geotiff.layout import Files


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
    bad_bands: tuple[int, ...] = ()  # 0-based data bands an ENVI header's `bbl` marks bad


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
            lossy_compression(src), envi_bad_bands(src, len(bands)),
        )  # fmt: skip


def envi_bad_bands(src: Any, count: int) -> tuple[int, ...]:
    """0-based positions an ENVI header's bad band list (`bbl`, 0 = bad) marks bad, where it
    lists `count` numbers and leaves some band good; () for any other file."""
    listed = src.tags(ns="ENVI").get("bbl")
    try:
        flags = [float(flag) for flag in (listed or "").strip("{} ").split(",")]
    except ValueError:
        return ()
    if len(flags) != count:
        return ()
    bad = tuple(p for p, flag in enumerate(flags) if flag == 0)
    return bad if len(bad) < count else ()


def refuse_other_bad_bands(expected: Header, found: Header) -> None:
    """Exit 3 where `found`'s ENVI bad band list is not `expected`'s: one list chooses the
    bands of every file."""
    if found.bad_bands == expected.bad_bands:
        return
    raise InputDataError(
        f"the bad bands its ENVI header lists (bbl) are {_listed(found.bad_bands)}, "
        f"{expected.path.parent.name}/{expected.path.name}'s {_listed(expected.bad_bands)}",
        found.path,
        "give every header one bad band list, or choose the bands with --bands",
    )


def _listed(bad: tuple[int, ...]) -> str:
    """1-based band numbers, or `none`."""
    return ", ".join(str(p + 1) for p in bad) if bad else "none"


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
    files: Files, task: Task, progress: Progress | None = None, bad_bands_chosen: bool = True
) -> dict[str, tuple[Header, Header]]:
    """`check_stem` of every stem, reported to `progress` as the stage "reading headers": a
    folder of 2,000 tiles takes seconds before the first patch is planned."""
    checked = {}
    for done, (stem, paths) in enumerate(files.items(), start=1):
        checked[stem] = check_stem(paths, task, bad_bands_chosen)
        if progress is not None:
            progress("reading headers", done, len(files))
    return checked


def check_stem(
    paths: dict[str, Path], task: Task, bad_bands_chosen: bool = True
) -> tuple[Header, Header]:
    """Headers of the stem's (first) image and of its label, after checking they agree. A label
    is one band of class codes, or three of class colours (RGB, as labelling tools export). A
    cd pair's phases list one set of ENVI bad bands where those choose the bands
    (`bad_bands_chosen`: no --bands)."""
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
    for other in images[1:] if bad_bands_chosen else []:
        refuse_other_bad_bands(images[0], other)
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
