"""Measure `specdm prepare segmunich` throughput (patches/s) and peak RSS, and RSS for 1k vs 4k patches.

Builds SegMunich raw trees of 128x128 patches in the real layout (tests/fixtures/segmunich.py),
runs the real CLI in a subprocess per size and reads its peak RSS from the kernel
(`resource.getrusage(RUSAGE_CHILDREN)` after each run), so the ratio 4k/1k RSS shows whether
memory stays flat in the dataset size.

    python examples/bench_prepare.py [--sizes 1000 4000] [--workers 4] [--keep DIR]

`--large PX` measures instead `prepare geotiff` on one PX x PX 10-band tiled GeoTIFF (and its
mask) cut into 64 px patches, in-process, with each loading thread's files kept open (as
shipped) and opened again for every window (as before), interleaved three times: the ratio is what
keeping a large file open saves.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.segmunich import make_segmunich


def _peak_rss_mib(command: list[str]) -> tuple[float, float]:
    """Run `command` in a fresh process; return (seconds, its peak RSS in MiB)."""
    script = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "subprocess.run(sys.argv[1:], check=True)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
    )
    output = subprocess.run(
        [sys.executable, "-c", script, *command], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(output[0]), float(output[1])


def _large_file(root: Path, side: int) -> Path:
    """images/scene.tif (10 bands, tiled 256, deflate, georeferenced) and masks/scene.tif,
    random content."""
    import numpy as np
    import rasterio

    rng = np.random.default_rng(0)
    from rasterio.transform import from_origin

    # A Sentinel-2-like scene: UTM, 10 m pixels, 256 px tiles as GDAL's COG driver writes.
    profile = {"driver": "GTiff", "width": side, "height": side, "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate", "crs": "EPSG:32632",
               "transform": from_origin(690000, 5340000, 10, 10)}  # fmt: skip
    for folder, count, dtype, high in (("images", 10, "uint16", 4000), ("masks", 1, "uint8", 5)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        values = rng.integers(0, high, (count, side, side), dtype=dtype)
        with rasterio.open(root / folder / "scene.tif", "w", count=count, dtype=dtype,
                           **profile) as dst:  # fmt: skip
            dst.write(values)
    return root


def _prepare_seconds(raw: Path, out: Path, workers: int, kept_open: int) -> float:
    from specdm_cli.pipeline.prepare.prepare import prepare
    from specdm_cli.pipeline.prepare.request import PrepareRequest
    from specdm_cli.pipeline.signals import StopFlag
    from specdm_cli.sources.base import PrepareOptions
    from specdm_cli.sources.geotiff import reader

    reader.FILES_KEPT_OPEN_PER_ARRAY = kept_open
    options = PrepareOptions(patch_size=64, overlap=0.0, val_fraction=0.1, test_fraction=0.1)
    request = PrepareRequest(source="geotiff", raw=raw, out=out, format="zarr", options=options,
                             overwrite=True, workers=workers)  # fmt: skip
    started = time.perf_counter()
    prepare(request, StopFlag())
    return time.perf_counter() - started


def large_file(work: Path, side: int, workers: int) -> None:
    """Keeping each thread's files open against opening them per window, side by side."""
    raw = _large_file(work / f"large-{side}", side)
    patches = (side // 64) ** 2
    seconds: dict[str, list[float]] = {"kept open": [], "opened per window": []}
    for _ in range(3):
        for name, kept in (("kept open", 2), ("opened per window", 0)):
            seconds[name].append(_prepare_seconds(raw, work / "large.zarr", workers, kept))
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    best = {name: min(values) for name, values in seconds.items()}
    for name, value in best.items():
        print(f"{name}: {patches} patches in {value:.1f} s, {patches / value:.0f} patches/s")
    ratio = best["opened per window"] / best["kept open"]
    print(f"speed-up of keeping files open: {ratio:.2f}x (best of 3 each, {workers} workers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep", type=Path, default=None, help="keep raw trees and stores here")
    parser.add_argument("--large", type=int, default=None, metavar="PX",
                        help="instead: one PX x PX GeoTIFF, files kept open vs opened per window")  # fmt: skip
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="specdm-bench-"))
    if args.large:
        large_file(work, args.large, args.workers)
        return
    rows = []
    for size in args.sizes:
        started = time.perf_counter()
        raw = make_segmunich(
            work / f"raw-{size}", splits={"train": size * 9 // 10, "val": size // 10}, size=128
        )
        built = time.perf_counter() - started
        store = work / f"segmunich-{size}.zarr"
        command = ["specdm", "prepare", "segmunich", str(raw), "--out", str(store), "--overwrite",
                   "--quiet", "--workers", str(args.workers)]  # fmt: skip
        seconds, rss = _peak_rss_mib(command)
        rows.append((size, seconds, size / seconds, rss))
        print(f"{size} patches: raw tree built in {built:.1f} s; prepare {seconds:.1f} s, "
              f"{size / seconds:.0f} patches/s, peak RSS {rss:.0f} MiB", flush=True)  # fmt: skip
    print("\n| patches | seconds | patches/s | peak RSS (MiB) |\n|---:|---:|---:|---:|")
    for size, seconds, rate, rss in rows:
        print(f"| {size} | {seconds:.1f} | {rate:.0f} | {rss:.0f} |")
    if len(rows) >= 2:
        print(f"\nRSS ratio {rows[-1][0]} vs {rows[0][0]} patches: {rows[-1][3] / rows[0][3]:.2f}x "
              f"(flat memory means close to 1)")  # fmt: skip


if __name__ == "__main__":
    main()
