"""GeoTIFF-folder reader: a user's own `images/`+`masks/` or `t1/`+`t2/`+`change/` tiles in."""

from specdm_cli.sources.geotiff.reader import read_geotiff

__all__ = ["read_geotiff"]
