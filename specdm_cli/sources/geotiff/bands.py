"""Band names and centre wavelengths from GDAL band descriptions and metadata."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from rasterio.enums import ColorInterp

from specdm_cli.manifest import Band
from specdm_cli.sources.geotiff.headers import data_bands, open_raster
from specdm_cli.sources.geotiff.layout import EXTENSIONS
from specdm_cli.sources.sentinel2 import S2_FWHM_NM, S2_WAVELENGTH_NM, s2_band_name

# "B04 (664.6 nm)", "664.6 nm", "Band 3: 0.56 um", ENVI's "Band 1 (450 Nanometers)": a number
# followed by a length unit.
_WAVELENGTH = re.compile(
    r"\(?\s*(\d+(?:\.\d*)?)\s*(nanometers?|nm|um|µm|micrometers?)\s*\)?", re.IGNORECASE
)
_COLOURS = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
_ABSOLUTE = re.compile(r"^(/|\\\\|[A-Za-z]:[\\/])")  # /x, \\server\x, C:\x


def read_bands(path: Path) -> list[Band]:
    """Band names and wavelengths from the descriptions and tags of `path`.

    A band named by a file path (as `gdalbuildvrt -separate` and ENVI band names leave them)
    is named by the file's stem; a set of Sentinel-2 names in any spelling (`B2`, `B02`,
    `B8a`, `..._B02`) takes the canonical names and the S2 wavelengths.
    """
    with open_raster(path) as src:
        bands = _as_sentinel2([_band(src, index) for index in data_bands(src)])
    names = [b.name for b in bands]
    # Band names are xarray coordinates: make repeats unique rather than lose a band.
    return [
        b.model_copy(update={"name": f"{b.name}_{i + 1}"}) if names.count(b.name) > 1 else b
        for i, b in enumerate(bands)
    ]


def _band(src: Any, index: int) -> Band:
    name, wavelength = _parse_description(src.descriptions[index - 1] or "")
    imagery = src.tags(index, ns="IMAGERY")
    wavelength = wavelength or _band_tag_wavelength(src.tags(index), imagery)
    fwhm = _float_or_none(imagery["FWHM_UM"], 1000.0) if "FWHM_UM" in imagery else None
    named = _trim_path(name) or _colour_name(src.colorinterp[index - 1]) or f"band_{index}"
    return Band(name=named, wavelength_nm=wavelength, fwhm_nm=fwhm)


def _colour_name(interp: ColorInterp) -> str | None:
    """A band without a description, named by GDAL's colour interpretation where that is a
    colour (a plain RGB GeoTIFF or PNG): `red`, `green`, `blue`, which previews then show."""
    return interp.name if interp in _COLOURS else None


def _trim_path(name: str) -> str:
    """A band named by its source file's path -> the file's stem (`/a/T32_B04.jp2` -> `T32_B04`).

    Only paths: a raster file name after a separator, or an absolute path; "NIR/red" stays.
    """
    base = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    if base == name:
        return name
    stem, dot, suffix = base.rpartition(".")
    if dot and f".{suffix.lower()}" in EXTENSIONS:
        return stem
    return base if _ABSOLUTE.match(name) else name


def _as_sentinel2(bands: list[Band]) -> list[Band]:
    """Canonical S2 names and wavelengths when every band is a distinct Sentinel-2 band."""
    # All or nothing: a cube named B1..B198 must not get S2 wavelengths for its first 12 bands.
    names = [s2_band_name(b.name) for b in bands]
    canonical = [n for n in names if n is not None]
    if len(canonical) != len(bands) or len(set(canonical)) != len(canonical):
        return bands
    return [
        Band(
            name=name,
            wavelength_nm=band.wavelength_nm or S2_WAVELENGTH_NM[name],
            fwhm_nm=band.fwhm_nm or S2_FWHM_NM[name],
        )
        for name, band in zip(canonical, bands, strict=True)
    ]


def _to_nm(value: float, unit: str) -> float:
    return value if unit.lower().startswith("n") else value * 1000.0


def _parse_description(text: str) -> tuple[str, float | None]:
    match = _WAVELENGTH.search(text)
    if match is None:
        return text.strip(), None
    name = (text[: match.start()] + text[match.end() :]).strip(" :-,_()")
    return name, _to_nm(float(match.group(1)), match.group(2))


def _band_tag_wavelength(tags: dict[str, str], imagery: dict[str, str]) -> float | None:
    # GDAL's standard band metadata (RFC 100) first, then a plain `wavelength` tag.
    if "CENTRAL_WAVELENGTH_UM" in imagery:
        return _float_or_none(imagery["CENTRAL_WAVELENGTH_UM"], 1000.0)
    lower = {key.lower(): value for key, value in tags.items()}
    if "wavelength" not in lower:
        return None
    unit = lower.get("wavelength_units", lower.get("units", "nm"))
    scale = 1.0 if unit.strip().lower() in ("nm", "nanometers", "nanometer") else 1000.0
    return _float_or_none(lower["wavelength"], scale)


def _float_or_none(text: str, scale: float) -> float | None:
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
