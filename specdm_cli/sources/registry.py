"""The one explicit registry of raw-data readers (`specdm prepare SOURCE`)."""

from __future__ import annotations

from specdm_cli.sources.base import Reader
from specdm_cli.sources.demo import read_demo
from specdm_cli.sources.geotiff import read_geotiff
from specdm_cli.sources.oscd import read_oscd
from specdm_cli.sources.segmunich import read_segmunich

READERS: dict[str, Reader] = {
    "segmunich": read_segmunich,
    "oscd": read_oscd,
    "geotiff": read_geotiff,
    "demo": read_demo,
}
# Sources that read no raw folder.
NO_RAW = frozenset({"demo"})
