"""The reader contract: a raw dataset in, validated numpy samples in physical units out."""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from specdm_cli.config import PrepareOptions as PrepareOptions
from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.fs.space import require_memory
from specdm_cli.manifest import IGNORE_INDEX, Band, ClassInfo, Task


@dataclass(frozen=True)
class SourceSpec:
    """What every sample of a source has in common; becomes the store's manifest."""

    dataset: str
    task: Task
    bands: list[Band]
    classes: list[ClassInfo]
    dtype: str
    height: int
    width: int
    crs: str | None = None
    rgb_bands: list[str] | None = None
    band_order_source: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """A cheap reference to one would-be sample; `load` turns it into a RawSample."""

    source_id: str
    split: str
    ref: Any


@dataclass
class RawSample:
    """One validated sample: `arrays` maps array names (`image`, `mask`, ...) to numpy arrays.

    Images are (C, H, W) in physical units with nodata already replaced; labels are (H, W)
    uint8 class indices with IGNORE_INDEX (255) for ignored and nodata pixels.
    `image_nodata` is (H, W) bool, True where any image was nodata or padding: the filled
    values there are stand-ins, so the blank filter counts them and statistics skip them.
    None means every image pixel is valid. `covered` is the (h, w) the source covers at the
    top left of a patch padded to size (a scene smaller than the patch); None: all of it.
    """

    source_id: str
    split: str
    arrays: dict[str, np.ndarray]
    bounds: tuple[float, float, float, float] | None = None
    nodata_pixels: int = 0
    image_nodata: np.ndarray | None = None
    covered: tuple[int, int] | None = None


@dataclass(frozen=True)
class LeftOut:
    """A part of the raw data a reader left out (a partial download), and why.

    `restored_by` are paths of which any, once present, makes a rerun read the part: a
    complete store that recorded the part is then refused rather than kept as it is.
    """

    part: str  # e.g. "test cities brasilia, chongqing"
    reason: str  # e.g. "no 'Onera ... - Test Labels' folder or .zip in RAW"
    warning: str  # the one line told (even under --quiet: data is missing, not progress)
    restored_by: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The manifest's entry (`source.details.left_out`)."""
        watched = [str(Path(path).absolute()) for path in self.restored_by]  # any cwd reruns
        return {"part": self.part, "reason": self.reason, "restored_by": watched}


@dataclass
class SourcePlan:
    """A reader's answer to `open`: the spec, the ordered candidates, and warnings for the user.

    `warnings` are one line each; `prepare` prints them on stderr and lists them in `--json`.
    `left_out` are the parts of the raw data the plan leaves out: told even under --quiet and
    recorded in the manifest.
    """

    spec: SourceSpec
    candidates: Sequence[Candidate]
    load: Callable[[Candidate], RawSample]
    warnings: list[str] = field(default_factory=list)
    close: Callable[[], None] = field(default=lambda: None)  # once every load is done
    left_out: list[LeftOut] = field(default_factory=list)


class Reader(Protocol):
    """A raw dataset reader: list candidates cheaply, load one on demand (thread-safe)."""

    def __call__(
        self, raw: Path | None, options: PrepareOptions, progress: Progress | None = None
    ) -> SourcePlan:
        """`progress` hears of a long planning (a folder of thousands of tiles)."""
        ...


def apply_nodata(
    image: np.ndarray,
    label: np.ndarray | None,
    nodata: float | None,
    path: Path | str,
    nan_is_nodata: bool = False,
    masked: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Replace nodata pixels of a (C, H, W) image in place; returns (pixel mask, count).

    A pixel is nodata where any band equals `nodata` (every band, in 8-bit imagery), is NaN
    when NaN is declared nodata, or is set in `masked` (the file's own mask, e.g. GDAL's). Its
    label becomes IGNORE_INDEX and each band takes the mean of the sample's valid pixels (0
    when none is valid). Any other NaN or inf is an error naming `path`.
    """
    invalid = np.zeros(image.shape[1:], dtype=bool) if masked is None else masked.copy()
    if nodata is not None and not np.isnan(nodata):
        matches = image == nodata
        # In a cube of reflectance one band at the tag is that band's footprint edge or fill; in
        # 8-bit imagery (RGB photos) 0 or 255 in one channel is a colour (a deep shadow, a bright
        # sky), so there, as in GDAL's dataset mask, only a pixel of the tag in every band is none.
        invalid |= matches.all(axis=0) if image.dtype == np.uint8 else matches.any(axis=0)
    if np.issubdtype(image.dtype, np.floating):
        nan_pixels = np.isnan(image).any(axis=0)
        if nan_is_nodata or (nodata is not None and np.isnan(nodata)):
            invalid |= nan_pixels
        elif nan_pixels.any():
            raise InputDataError(
                "image has NaN pixels but NaN is not declared nodata",
                path,
                "pass --nodata nan or fix the file",
            )
        inf_pixels = np.isinf(image).any(axis=0) & ~invalid
        if inf_pixels.any():
            raise InputDataError("image has infinite values", path, "fix or remove the file")
    count = int(invalid.sum())
    if count:
        valid = ~invalid
        for band in image:
            band[invalid] = band[valid].mean() if valid.any() else 0
        if label is not None:
            label[invalid] = IGNORE_INDEX
    return invalid, count


def require_integer_labels(raw: np.ndarray, path: Path | str) -> None:
    """Label codes are integers; NaN is most often a float mask's "no label"."""
    if np.issubdtype(raw.dtype, np.integer):
        return
    if np.isnan(raw).any():
        raise InputDataError(
            "label file holds NaN values",
            path,
            "if NaN means no label there, pass --label-nodata nan; else fix the file",
        )
    if not (np.all(np.isfinite(raw)) and np.all(raw == np.round(raw))):
        raise InputDataError("label file holds non-integer values", path, "fix the file")


# A label pixel marked no data before codes map to indices: no code any raster holds, so a
# class list may take 255 as a code (0/255 change and building masks) and nodata still reads 255.
NODATA_CODE = -(1 << 62)


def remap_labels(raw: np.ndarray, codes: Sequence[int], path: Path | str) -> np.ndarray:
    """Map raw label codes to indices 0..K-1 (255 stays ignore unless it is one of `codes`,
    NODATA_CODE is ignore); an unknown code is an error."""
    require_integer_labels(raw, path)
    values = raw.astype(np.int64)
    lut = {int(code): index for index, code in enumerate(codes)}
    lut.setdefault(IGNORE_INDEX, IGNORE_INDEX)
    lut[NODATA_CODE] = IGNORE_INDEX
    # Codes map through the values present, never a table of max code + 1 entries: a code of
    # 2e9 (CORINE-style or hostile) costs nothing more than a small one.
    present, position = np.unique(values, return_inverse=True)
    unknown = [int(v) for v in present if int(v) not in lut]
    if unknown:
        negative = [v for v in unknown if v < 0]
        hint = (
            f"if {negative[0]} means no data, pass --label-nodata {negative[0]}"
            if negative
            else "fix the label file, or pass --label-nodata CODE if that code means no data"
        )
        raise InputDataError(
            f"unknown label code(s) {unknown[:5]} (known: {sorted(set(lut) - {NODATA_CODE})})",
            path,
            hint,
        )
    indices = np.array([lut[int(v)] for v in present], dtype=np.uint8)
    mapped: np.ndarray = indices[position].reshape(values.shape)
    return mapped


def require_whole_read(height: int, width: int, bytes_per_pixel: int, path: Path) -> None:
    """Refuse (exit 5), from its header, a raster a reader loads whole that would not fit in
    memory: a damaged or hostile header can claim any size in a tiny file."""
    require_memory(
        float(height) * width * bytes_per_pixel,
        f"reading a {height}x{width} raster whole",
        "check the file (its header may be damaged) or cut it into tiles (gdal_retile.py)",
        path,
    )


def window_count(height: int, width: int, size: int, overlap: float) -> int:
    """len(patch_windows(...)), computed without listing them (a header may ask for 10^12)."""
    stride = max(1, round(size * (1.0 - overlap)))
    return _start_count(height, size, stride) * _start_count(width, size, stride)


def _start_count(length: int, size: int, stride: int) -> int:
    if length <= size:
        return 1
    full = (length - size) // stride + 1
    return full + (1 if (full - 1) * stride != length - size else 0)


def patch_windows(height: int, width: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """Top-left corners of size x size windows with the given overlap that cover the whole image.

    The last window in each direction is moved back to touch the edge, so edges are covered
    without padding; an image smaller than a window gets one window at (0, 0) (caller pads).
    """
    stride = max(1, round(size * (1.0 - overlap)))
    return [(y, x) for y in _starts(height, size, stride) for x in _starts(width, size, stride)]


def _starts(length: int, size: int, stride: int) -> list[int]:
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def patch_bounds(
    transform: Any, y: int, x: int, height: int, width: int
) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a height x width window at (y, x), padding included."""
    # Corners with `@`: rasterio's window_bounds uses Affine's deprecated `*`.
    (x0, y0), (x1, y1) = transform @ (x, y), transform @ (x + width, y + height)
    return float(min(x0, x1)), float(min(y0, y1)), float(max(x0, x1)), float(max(y0, y1))


def pad_to(array: np.ndarray, height: int, width: int, fill: float) -> np.ndarray:
    """Pad the last two axes of `array` at the bottom and right to (height, width)."""
    pad_y, pad_x = height - array.shape[-2], width - array.shape[-1]
    if pad_y <= 0 and pad_x <= 0:
        return array
    widths = [(0, 0)] * (array.ndim - 2) + [(0, max(pad_y, 0)), (0, max(pad_x, 0))]
    return np.pad(array, widths, constant_values=fill)


def pad_image_as_nodata(
    image: np.ndarray, invalid: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Pad a (C, h, w) image to (height, width) like nodata: each band takes its valid mean."""
    if image.shape[1:] == (height, width):
        return image
    valid = ~invalid
    means = image[:, valid].mean(axis=1) if valid.any() else np.zeros(image.shape[0])
    padded = pad_to(image, height, width, 0)
    outside = np.ones((height, width), dtype=bool)
    outside[: image.shape[1], : image.shape[2]] = False
    padded[:, outside] = means.astype(image.dtype)[:, None]
    return padded


def class_fraction(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction of labelled (non-ignore) pixels per class; zeros when none is labelled."""
    counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=num_classes)
    total = counts.sum()
    return (counts[:num_classes] / total if total else np.zeros(num_classes)).astype(np.float32)


def integral(value: float | None) -> int | None:
    """`value` as an int when it is a finite whole number (NaN and inf tags are not codes)."""
    if value is None or not math.isfinite(value) or value != round(value):
        return None
    return int(value)


def refuse_class_nodata(label_nodata: float | None, classes: dict[int, str], where: str) -> None:
    """`--label-nodata` naming one of a dataset's class codes (`classes`: code -> name, from
    its label codes or a classes file at `where`) would turn every pixel of that class into 255
    (ignored): a usage error, not a store without the class."""
    code = integral(label_nodata)
    if code in classes:
        raise UsageError(
            f"--label-nodata {code} is the class {classes[code]!r} in {where}",
            hint="drop --label-nodata, or give the value that marks no data in the labels",
        )


def label_values(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Raw label values with the label nodata (--label-nodata, else the file's tag) as
    NODATA_CODE (remap_labels reads it as 255, apart from a class coded 255)."""
    values = raw.astype(np.float64 if raw.dtype.kind == "f" else np.int64)
    values[label_nodata_mask(raw, nodata)] = NODATA_CODE
    return values


def label_nodata_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W) bool: where a raw label equals its nodata value (NaN matches NaN)."""
    if nodata is None:
        return np.zeros(raw.shape, dtype=bool)
    if math.isnan(nodata):
        return np.isnan(raw) if raw.dtype.kind == "f" else np.zeros(raw.shape, dtype=bool)
    if raw.dtype == np.float32:
        return _float32_equal(raw, nodata)
    return np.asarray(raw == nodata)


def _float32_equal(raw: np.ndarray, nodata: float) -> np.ndarray:
    """Where float32 pixels equal `nodata` as GDAL's nodata mask (the image side) matches them:
    ARE_REAL_EQUAL in float32, so a tag written rounded (-3.40282e+38, ArcGIS and QGIS) still
    matches the -3.4028235e+38 pixels of the same files, which `==` on the tag misses."""
    # inf - inf (an inf tag over inf pixels) is NaN, and compares False: `==` matched them.
    with np.errstate(over="ignore", invalid="ignore"):
        tag = np.float32(nodata)
        # The sum overflows to inf beside +-FLT_MAX: that is what lets GDAL match a rounded tag.
        tolerance = 2 * np.finfo(np.float32).eps * np.abs(raw + tag)
        return np.asarray((raw == tag) | (np.abs(raw - tag) < tolerance))


def iter_nonempty_lines(path: Path) -> Iterator[str]:
    """Stripped, non-empty lines of a text file (CRLF and a byte-order mark tolerated)."""
    for line in read_text_input(path).splitlines():
        if line.strip():
            yield line.strip()


def read_text_input(path: Path) -> str:
    """A text file of the raw data: UTF-8 (a byte-order mark dropped, as spreadsheets write
    one) or UTF-16 with its mark (Windows Notepad's "Unicode"); what cannot be read is an
    input error naming the file, not a write error or a traceback."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputDataError(
            f"cannot read ({exc.strerror or exc})", path, "check the file"
        ) from None
    return decode_text(data, path)


def decode_text(data: bytes, path: Path) -> str:
    """The bytes of a text file (see read_text_input) as text; `path` names it in an error."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputDataError(
            f"not UTF-8 text (byte {exc.start})", path, "save it as UTF-8 text"
        ) from None


def broken_link(path: Path) -> InputDataError:
    """The error of a link whose target is missing: git-annex and DVC leave these until the
    data is fetched, so the fix is fetching, not re-downloading a "corrupt" file."""
    return InputDataError(
        "broken link: the raster it points to is not there (git-annex and DVC leave these "
        "until the data is fetched)",
        path,
        "fetch the data (git annex get, dvc pull) or remove the link",
    )


# Downloads people pass as RAW before extracting them (OSCD's reader reads its zips in place).
_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


def require_dir(path: Path | None, what: str) -> Path:
    """`path` as an existing non-empty directory, else a one-line input error."""
    if path is None:
        raise InputDataError(f"{what} needs a RAW folder", hint="pass the path of the raw data")
    if not path.exists():
        raise InputDataError("folder does not exist", path, "check the path")
    if not path.is_dir():
        if what == "oscd" and path.suffix.lower() == ".zip":
            raise InputDataError(
                "an archive, not a folder",
                path,
                f"pass the folder that holds it ({path.parent}): OSCD's zips are read in place",
            )
        if path.name.lower().endswith(_ARCHIVES):
            raise InputDataError(
                "an archive, not a folder",
                path,
                f"extract it (e.g. `unzip {path.name} -d DIR`, `tar -xf {path.name} -C DIR`) "
                "and pass the folder",
            )
        raise InputDataError("not a folder", path, "pass the folder that holds the raw data")
    if not any(path.iterdir()):
        raise InputDataError("folder is empty", path, "download or extract the data into it")
    return path
