"""Coordinate reference systems of a folder's rasters: named, compared and shown as a user reads
them (EPSG codes, WKT names; one CRS spelled as a PROJ string and as ESRI WKT is one CRS)."""

from __future__ import annotations

import functools
import re

from rasterio.crs import CRS


@functools.lru_cache(maxsize=16)
def crs_name(wkt: str) -> str:
    """EPSG:xxxx when the CRS has a code, else its WKT (cached: a PROJ lookup per file is slow)."""
    epsg = CRS.from_wkt(wkt).to_epsg()
    return f"EPSG:{epsg}" if epsg else wkt


def shown_crs(crs: str | None) -> str:
    """A CRS for an error line: its EPSG code, else the name its WKT gives (a WKT is ~600
    characters), else the start of it."""
    if crs is None:
        return "none"
    if not crs.lstrip().endswith("]"):
        return crs
    name = re.match(r'\s*\w+\["([^"]*)"', crs)
    return f"{name.group(1)!r} (WKT)" if name else crs[:60] + "..."


@functools.lru_cache(maxsize=64)
def same_crs(first: str, second: str) -> bool:
    """Whether two spellings name one CRS, as rasterio compares them (`CRS ==`): a custom CRS
    written from a PROJ string and from its ESRI WKT (as ArcGIS writes masks) differ as text."""
    return first == second or CRS.from_user_input(first) == CRS.from_user_input(second)


def told_apart(first: str, second: str) -> tuple[str, str]:
    """Two CRSs that differ, shown so the reader sees how: by EPSG code or WKT name, else (two
    custom CRSs, both named 'unknown') by their PROJ strings."""
    shown = shown_crs(first), shown_crs(second)
    if shown[0] != shown[1]:
        return shown
    return _proj(first), _proj(second)


def _proj(crs: str) -> str:
    # Flags (`+no_defs`, `+type=crs`) are the same in every CRS: left out.
    terms = [f"+{key}={value}" for key, value in CRS.from_user_input(crs).to_dict().items()]
    text = " ".join(term for term in terms if not term.endswith("=True"))
    if not text:  # a CRS PROJ strings cannot express
        return shown_crs(crs)
    return repr(text if len(text) <= 120 else text[:117] + "...")


def one_spelling(crs_by_stem: dict[str, str | None]) -> dict[str, str | None]:
    """Each CRS as the first file that names it spells it: tiles of one custom CRS written
    as a PROJ string and as ESRI WKT are one CRS, so the store keeps its bounds."""
    spellings: list[str] = []
    for stem, crs in crs_by_stem.items():
        if crs is None:
            continue
        known = next((seen for seen in spellings if same_crs(seen, crs)), None)
        if known is None:
            spellings.append(crs)
        crs_by_stem[stem] = known or crs
    return crs_by_stem
