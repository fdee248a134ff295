"""Measure `specdm prepare segmunich` throughput (patches/s) and peak RSS, and RSS for 1k vs 4k patches.

Builds SegMunich raw trees of 128x128 patches in the real layout (tests/fixtures/segmunich.py),
runs the real CLI in a subprocess per size and reads its peak RSS from the kernel
(`resource.getrusage(RUSAGE_CHILDREN)` after each run), so the ratio 4k/1k RSS shows whether
memory stays flat in the dataset size.

    python examples/bench_prepare.py [--sizes 1000 4000] [--workers 4] [--keep DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep", type=Path, default=None, help="keep raw trees and stores here")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="specdm-bench-"))
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
