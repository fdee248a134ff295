"""The one explicit registry of raw-data readers (`specdm prepare SOURCE`)."""

from __future__ import annotations

from pathlib import Path

from specdm_cli.manifest import Task
from specdm_cli.sources.base import Reader, require_dir
from specdm_cli.sources.demo import read_demo
from specdm_cli.sources.geotiff import read_geotiff
from specdm_cli.sources.geotiff.layout import infer_task
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


def data_task(source: str, raw: Path | None) -> Task | None:
    """The task a source's data holds, told from its layout alone (None: the demo's is chosen)."""
    if source == "geotiff":
        return infer_task(require_dir(raw, "geotiff"))
    fixed: dict[str, Task] = {"segmunich": "ss", "oscd": "cd"}
    return fixed.get(source)
