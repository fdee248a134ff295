"""`prepare geotiff --bands`: which of the files' bands the store keeps, and the bad bands of a
cube (filled with nodata in every pixel) that make the option necessary."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from specdm_cli.errors import InputDataError, UsageError
from specdm_cli.manifest import Band
from specdm_cli.sources.geotiff.headers import (
    Header,
    data_bands,
    open_raster,
    refuse_other_bad_bands,
)

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
# Pixels a side of the reads that look for bad bands: a band at the fill value in every one of
# 128 x 128 pixels spread over the file holds no data (water-vapour bands, as some
# hyperspectral products ship them).
_PROBE_SIDE = 128


def chosen_positions(
    selection: Sequence[str] | None, bands: list[Band], path: Path, bad: Sequence[int] = ()
) -> list[int]:
    """0-based positions, among the files' data bands, of the bands `--bands` names (1-based
    numbers, ranges `1-5`, or band names as `inspect` shows them); without it, every band but
    the `bad` ones (an ENVI header's bad band list)."""
    if not selection:
        return [p for p in range(len(bands)) if p not in bad]
    positions: list[int] = []
    for token in selection:
        positions += _positions_of(token, [band.name for band in bands], path)
    repeated = sorted({p + 1 for p in positions if positions.count(p) > 1})
    if repeated:
        raise UsageError(
            f"--bands names band {repeated[0]} twice", hint="name each band once, in file order"
        )
    return positions


def _positions_of(token: str, names: list[str], path: Path) -> list[int]:
    count = len(names)
    ranged = _RANGE.match(token)
    if token.isdigit() or ranged:
        first, last = (int(token), int(token)) if ranged is None else map(int, ranged.groups())
        if not 1 <= first <= last:
            raise UsageError(f"--bands {token}: not a range of band numbers", hint="e.g. 1-5,8-12")
        if last > count:
            raise InputDataError(
                f"--bands {token} is past the {count} bands of the images",
                path,
                f"number bands 1 to {count}",
            )
        return list(range(first - 1, last))
    lowered = [name.lower() for name in names]
    if token.lower() in lowered:
        return [lowered.index(token.lower())]
    shown = ", ".join(names[:6]) + (", ..." if count > 6 else "")
    raise InputDataError(
        f"--bands {token}: no band of that name (the images' bands: {shown})",
        path,
        "name bands by number (1-5,8-12) or as listed",
    )


def one_bad_band_list(headers: Sequence[Header]) -> tuple[int, ...]:
    """The bands the images' ENVI headers mark bad (`bbl`), 0-based.

    Raises:
        InputDataError: a header lists other bad bands than the first file's, which would
            choose the bands of all files.
    """
    for header in headers[1:]:
        refuse_other_bad_bands(headers[0], header)
    return headers[0].bad_bands


def bad_bands_note(bad: Sequence[int], path: Path) -> str:
    numbers = _ranges(list(bad))
    return (
        f"note: left out band{'s' if len(bad) > 1 else ''} {numbers}, which the ENVI header of "
        f"{path.name} marks bad (bbl); --bands chooses the bands instead"
    )


def refuse_empty_bands(path: Path, positions: list[int], nodata: float | None) -> None:
    """Exit 3 where some chosen bands of `path` hold only nodata (the tag or `nodata`, or NaN)
    while others hold data: each of their pixels would count as nodata (a pixel is nodata where
    any band is), so every patch would be dropped as blank. The fix leaves them out.

    Bands with data in a few windows are cleared at once; the others (suspects, all of them in
    a file whose data misses the windows) are read again on a grid over the whole file, which
    decodes every block of the bands read (80 s for a sparse 20,000 px file of 512 bands)."""
    with open_raster(path) as src:
        if np.dtype(src.dtypes[0]) == np.uint8:
            return  # 8-bit pixels are nodata only in every band (base.apply_nodata)
        fill = src.nodata if nodata is None else nodata
        file_bands = data_bands(src)  # src.colorinterp asks GDAL for every band: read once
        band_of = {p: file_bands[p] for p in positions}
        windowed = _sampled(src, list(band_of.values()), _probe_windows(src.height, src.width))
        suspects = [
            p for p, band in zip(positions, windowed, strict=True) if _only_fill(band, fill)
        ]
        if not suspects:
            return
        spread = _sampled(src, [band_of[p] for p in suspects])
    bad = [p for p, band in zip(suspects, spread, strict=True) if _only_fill(band, fill)]
    if not bad or len(bad) == len(positions):
        return  # no bad band, or a file of nodata only (a scene's edge): the filters say so
    kept = [p for p in positions if p not in bad]
    which = f"bands {_ranges(bad)} hold" if len(bad) > 1 else f"band {bad[0] + 1} holds"
    raise InputDataError(
        f"{which} only nodata in every pixel (bad bands of the sensor?): "
        "every pixel would count as nodata",
        path,
        f"leave them out: --bands {_ranges(kept)}",
    )


def _sampled(src: Any, indexes: list[int], windows: list[Window] | None = None) -> np.ndarray:
    """(bands, pixels) of the 1-based band `indexes`: read in `windows`, else on a grid of
    128 x 128 pixels over the whole file (a nearest-neighbour decimated read)."""
    # One read of each window for all bands (a pixel-interleaved cube decodes a block once),
    # band by band only where a VRT of band files mixes types, which one read cannot return.
    same_type = len({src.dtypes[i - 1] for i in indexes}) == 1
    groups = [indexes] if same_type else [[i] for i in indexes]
    if windows is None:
        shape = (min(src.height, _PROBE_SIDE), min(src.width, _PROBE_SIDE))
        reads = [
            src.read(g, out_shape=(len(g), *shape), resampling=Resampling.nearest) for g in groups
        ]
    else:
        reads = [np.stack([src.read(g, window=w) for w in windows], 1) for g in groups]
    return np.concatenate([values.reshape(len(values), -1) for values in reads])


def _probe_windows(height: int, width: int) -> list[Window]:
    """Windows at the centres of a 4 x 4 grid over the file, 128 x 128 pixels in all (fewer,
    not repeated, in a file under 128 px a side): a read of each touches a block or a few of
    a band."""
    side_y, side_x = min(height, _PROBE_SIDE // 4), min(width, _PROBE_SIDE // 4)
    centres = (np.arange(4) + 0.5) / 4
    rows = np.clip(centres * height - side_y / 2, 0, height - side_y).astype(int)
    cols = np.clip(centres * width - side_x / 2, 0, width - side_x).astype(int)
    corners = dict.fromkeys((int(x), int(y)) for y in rows for x in cols)
    return [Window(x, y, side_x, side_y) for x, y in corners]


def _only_fill(values: np.ndarray, fill: float | None) -> bool:
    """Whether `values` hold nothing but `fill` or NaN."""
    empty = np.isnan(values) if values.dtype.kind == "f" else np.zeros(values.shape, dtype=bool)
    if fill is not None and not np.isnan(fill):
        empty |= values == fill
    return bool(empty.all())


def _ranges(positions: list[int]) -> str:
    """0-based positions as 1-based ranges: [0, 1, 2, 4] -> `1-3,5`."""
    spans: list[list[int]] = []
    for number in (p + 1 for p in positions):
        if spans and number == spans[-1][-1] + 1:
            spans[-1].append(number)
        else:
            spans.append([number])
    return ",".join(str(s[0]) if len(s) == 1 else f"{s[0]}-{s[-1]}" for s in spans)
