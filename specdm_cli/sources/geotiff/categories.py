"""Class names a mask file carries: ENVI's `class names`, GDAL's category names and raster
attribute tables in its `.aux.xml` (as ArcGIS, QGIS and GDAL write them beside classified
rasters such as NLCD and CORINE). rasterio reads none of them through an API of its own."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

# GDAL's GDALRATFieldUsage: the column of class names, of pixel values (one value or a range).
_USAGE_NAME = "2"
_USAGE_VALUE = ("5", "3")  # MinMax, Min
_TYPE_STRING = "2"
# Columns ArcGIS and product RATs name the class in without marking it GFU_Name.
_NAME_COLUMN = re.compile(r"class|name|label|descr", re.IGNORECASE)


def category_names(src: Any, path: Path) -> dict[int, str]:
    """The names the file gives its first band's codes, by code; empty where it gives none."""
    envi = src.tags(ns="ENVI").get("class_names") if "ENVI" in src.tag_namespaces() else None
    if envi:
        return _numbered(part.strip() for part in envi.strip("{} ").split(","))
    return _pam_names(Path(f"{path}.aux.xml"))


def _numbered(names: Any) -> dict[int, str]:
    """Names listed in code order (code = position), blanks skipped."""
    return {code: name for code, name in enumerate(names) if name}


def _pam_names(aux: Path) -> dict[int, str]:
    if not aux.is_file():
        return {}
    try:
        root = ElementTree.parse(aux).getroot()
    except (ElementTree.ParseError, OSError):
        return {}  # a sidecar GDAL itself could not read: the names are only a courtesy
    band = next((b for b in root.iter("PAMRasterBand") if b.get("band", "1") == "1"), None)
    if band is None:
        return {}
    categories = band.find("CategoryNames")
    if categories is not None:
        return _numbered((c.text or "").strip() for c in categories.findall("Category"))
    table = band.find("GDALRasterAttributeTable")
    return {} if table is None else _table_names(table)


def _table_names(table: ElementTree.Element) -> dict[int, str]:
    """Names of a raster attribute table: its name column by its value column, or by row where
    the table bins values linearly (row i holds Row0Min + i x BinSize)."""
    fields = [
        (f.findtext("Name", ""), f.findtext("Type", ""), f.findtext("Usage", ""))
        for f in table.findall("FieldDefn")
    ]
    name_column = _name_column(fields)
    if name_column is None:
        return {}
    value_column = next(
        (i for i, (name, _, usage) in enumerate(fields)
         if usage in _USAGE_VALUE or name.lower() == "value"),
        None,
    )  # fmt: skip
    first = float(table.get("Row0Min", "0"))
    step = float(table.get("BinSize", "1"))
    names: dict[int, str] = {}
    for index, row in enumerate(table.findall("Row")):
        cells = [(cell.text or "").strip() for cell in row.findall("F")]
        code = _code(cells, value_column, first + index * step)
        if code is not None and name_column < len(cells) and cells[name_column]:
            names[code] = cells[name_column]
    return names


def _name_column(fields: list[tuple[str, str, str]]) -> int | None:
    marked = [i for i, (_, _, usage) in enumerate(fields) if usage == _USAGE_NAME]
    if marked:
        return marked[0]
    return next(
        (i for i, (name, kind, _) in enumerate(fields)
         if kind == _TYPE_STRING and _NAME_COLUMN.search(name)),
        None,
    )  # fmt: skip


def _code(cells: list[str], value_column: int | None, binned: float) -> int | None:
    text = cells[value_column] if value_column is not None and value_column < len(cells) else None
    try:
        value = float(text) if text is not None else binned
    except ValueError:
        return None
    return int(value) if value.is_integer() else None
