"""What makes an output reproducible: command line, versions, time."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import Any

from specdm_cli import __version__

_LIBRARIES = ("numpy", "zarr", "rasterio", "tifffile", "torch", "diffusers", "pydantic")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape outputs (without importing them)."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def provenance() -> dict[str, Any]:
    """The provenance block of a manifest or run."""
    return {
        "command": " ".join(sys.argv),
        "tool_version": __version__,
        "python": platform.python_version(),
        "libraries": library_versions(),
        "host_platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
