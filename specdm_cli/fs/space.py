"""Room for a job, checked from its sizes before it allocates or writes (exit 5 when short).

A header or an option can ask for more than the machine has (a 234 KB sparse GeoTIFF whose
header says 100000 x 100000, `--n 10**12`): the bytes are planned from the sizes first and the
job is refused at once with the figures, instead of failing hours later or exhausting memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from specdm_cli.errors import ResourceError

GB = 1e9


def free_disk_bytes(path: Path) -> int:
    """Free bytes (for an unprivileged writer) on the filesystem that holds or will hold `path`."""
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def available_memory_bytes() -> int | None:
    """Memory the kernel can give without swapping (Linux MemAvailable); None where unknown."""
    try:
        with Path("/proc/meminfo").open(encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def require_disk(needed: float, where: Path, what: str, hint: str) -> None:
    """Refuse (exit 5) a job whose output needs more than the free space where it goes."""
    free = free_disk_bytes(where)
    if needed > free:
        raise ResourceError(
            f"{what} needs about {needed / GB:.3g} GB, {free / GB:.3g} GB free", where, hint
        )


def require_memory(needed: float, what: str, hint: str, where: Path | None = None) -> None:
    """Refuse (exit 5) a job that would need more memory than the machine has available."""
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ResourceError(
            f"{what} needs about {needed / GB:.3g} GB of memory, {available / GB:.3g} GB available",
            where,
            hint,
        )
