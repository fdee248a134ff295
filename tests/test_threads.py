"""Thread defaults that hold on a shared host: the CPUs a process may use, and sleeping OpenMP
waits chosen before torch loads (examples/bench_synthesize.py --only threads measures both)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from specdm_cli.pipeline.devices import available_cpus, torch_threads
from tests import processes


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("200000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None), (None, None)],
)
def test_available_cpus_follow_affinity_and_the_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, limit: int | None
) -> None:
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max, encoding="ascii")
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(path) == min(affinity, limit or affinity)


def test_default_threads_are_the_available_cpus() -> None:
    import torch

    with torch_threads(None):
        assert torch.get_num_threads() == available_cpus()
    with torch_threads(1):
        assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("given", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_specdm_chooses_sleeping_waits_unless_the_user_chose(
    given: str | None, seen: str
) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        environment["OMP_WAIT_POLICY"] = given
    code = "import os, specdm_cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    done = processes.run([sys.executable, "-c", code], env=environment, text=True)
    assert done.returncode == 0 and done.stdout.strip() == seen


@pytest.mark.parametrize(("given", "seen"), [(None, 256 << 20), ("64", 64 << 20)])
def test_importing_specdm_bounds_gdals_block_cache_unless_the_user_chose(
    given: str | None, seen: int
) -> None:
    """GDAL's default (5% of RAM, filled by every prepare worker's handles) made a 4000 x 4000
    scene peak at 1.39 GB: GDAL sees 256 MB (rasterio gives bytes) unless the user set it."""
    environment = {k: v for k, v in os.environ.items() if k != "GDAL_CACHEMAX"}
    if given:
        environment["GDAL_CACHEMAX"] = given
    code = (
        "import specdm_cli, rasterio; from rasterio.env import get_gdal_config; "
        "print(get_gdal_config('GDAL_CACHEMAX'))"
    )
    done = processes.run([sys.executable, "-c", code], env=environment, text=True)
    assert done.returncode == 0 and int(done.stdout) == seen, done.stderr
