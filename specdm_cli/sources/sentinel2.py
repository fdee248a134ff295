"""Sentinel-2 MSI band facts shared by the SegMunich, OSCD and demo sources."""

from __future__ import annotations

import re

from specdm_cli.manifest import Band

# S2A centre wavelengths (nm), Sentinel-2A MSI SRF (ESA COPE-GSEG-EOPG-TN-15-0007), via torchgeo;
# B02 492.7 as in the later SRF revision. Bandwidths (FWHM) are S2A's.
S2_WAVELENGTH_NM: dict[str, float] = {
    "B01": 442.7,
    "B02": 492.7,
    "B03": 559.8,
    "B04": 664.6,
    "B05": 704.1,
    "B06": 740.5,
    "B07": 782.8,
    "B08": 832.8,
    "B8A": 864.7,
    "B09": 945.1,
    "B10": 1373.5,
    "B11": 1613.7,
    "B12": 2202.4,
}
S2_FWHM_NM: dict[str, float] = {
    "B01": 21,
    "B02": 66,
    "B03": 36,
    "B04": 31,
    "B05": 15,
    "B06": 15,
    "B07": 20,
    "B08": 106,
    "B8A": 21,
    "B09": 20,
    "B10": 31,
    "B11": 91,
    "B12": 175,
}
S2_ALL_BANDS: tuple[str, ...] = tuple(S2_WAVELENGTH_NM)
# The ten bands SpecDM uses (paper section 4.1): the 10 m bands then the 20 m bands.
S2_TEN_BANDS: tuple[str, ...] = (
    "B02",
    "B03",
    "B04",
    "B08",
    "B05",
    "B06",
    "B07",
    "B8A",
    "B11",
    "B12",
)
S2_RGB_BANDS: tuple[str, str, str] = ("B04", "B03", "B02")
S2_BAND_SOURCE = "Sentinel-2A MSI SRF (ESA COPE-GSEG-EOPG-TN-15-0007), via torchgeo"


def s2_bands(names: tuple[str, ...] | list[str]) -> list[Band]:
    """Manifest bands for Sentinel-2 band names."""
    return [Band(name=n, wavelength_nm=S2_WAVELENGTH_NM[n], fwhm_nm=S2_FWHM_NM[n]) for n in names]


# A Sentinel-2 band name at the end of a text: "B2", "B02", "b8a", "B08A", "..._B02", "B02.tif".
_S2_NAME = re.compile(r"(?:^|[^A-Za-z0-9])B0?(\d{1,2})(A?)(?:\.(?:tiff?|jp2))?$", re.IGNORECASE)
# L1C products carry all 13 bands; L2A drops the cirrus band B10 (12 bands).
S2_L2A_BANDS: tuple[str, ...] = tuple(b for b in S2_ALL_BANDS if b != "B10")


def s2_band_name(text: str) -> str | None:
    """The canonical name (B01..B12, B8A) of a Sentinel-2 band spelling, else None.

    Accepts `B1`/`B01`, `B8A`/`B8a`/`B08A`, product prefixes (`T32UQD_20200101_B02`) and a
    `.tif`/`.jp2` suffix; anything else (B13, `band_1`, a wavelength) is not a name.
    """
    match = _S2_NAME.search(text.strip())
    if match is None:
        return None
    number, suffix = int(match.group(1)), match.group(2).upper()
    name = f"B{number}A" if suffix else f"B{number:02d}"
    return name if name in S2_WAVELENGTH_NM else None
