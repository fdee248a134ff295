"""Every quality metric for real-vs-real halves of a demo store and for corrupted copies of it.

    python examples/metrics_table.py --task ss --n 384 --out /tmp/metrics-demo

Prepares a demo store (`specdm prepare demo`, half of it held out as val), fits the feature
network on its train split, then compares val half A (the reference side) with val half B as
it is and as corrupted copies: masks shuffled across samples, a spectral shift on some bands, a
spatial blur, a class rebalance (samples dropped). Prints one table; each column should move
the metric meant to catch it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.pipeline.benchmark.features import default_config, load_or_train
from specdm_cli.pipeline.benchmark.quality import QualityReport, compare_stores
from specdm_cli.stores import open_store
from specdm_cli.stores.zarr_store import ZarrWriter

Corruption = Callable[[zarr.Group, str, np.ndarray], None]


def array_of(group: zarr.Group, name: str) -> zarr.Array[Any]:
    array = group[name]
    assert isinstance(array, zarr.Array), f"{name} is not an array"
    return array


def read(group: zarr.Group, name: str, index: int | slice) -> np.ndarray:
    return np.asarray(array_of(group, name)[index])


def shuffle_masks(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    """Give each sample of `rows` the mask of another one (a derangement by rotation)."""
    label = array_of(group, LABEL_ARRAY[task])
    masks = np.stack([read(group, LABEL_ARRAY[task], int(i)) for i in rows])
    for i, mask in zip(rows, np.roll(masks, 1, axis=0), strict=True):
        label[int(i)] = mask


def spectral_shift(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    """Scale the red-edge/NIR bands (4-8) by 0.85 and lift the visible ones (0-2) by 300."""
    for name in IMAGE_ARRAYS[task]:
        array = array_of(group, name)
        for i in rows:
            image = read(group, name, int(i)).astype(np.float64)
            image[3:8] *= 0.85
            image[0:3] += 300
            array[int(i)] = np.clip(image, 0, 65535).astype(array.dtype)


def blur(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    """A 5 x 5 box blur of every band (edges replicated)."""
    for name in IMAGE_ARRAYS[task]:
        array = array_of(group, name)
        for i in rows:
            image = read(group, name, int(i)).astype(np.float64)
            padded = np.pad(image, ((0, 0), (2, 2), (2, 2)), mode="edge")
            height, width = image.shape[1:]
            total = np.zeros_like(image)
            for dy in range(5):
                for dx in range(5):
                    total += padded[:, dy : dy + height, dx : dx + width]
            array[int(i)] = np.rint(total / 25).astype(array.dtype)


def rebalance(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    """Drop (mark unwritten) the half of `rows` richest in the rarest class of `rows`."""
    fractions = read(group, "class_fraction", slice(None))[rows]
    rare = int(np.argmin(fractions.mean(axis=0)))
    order = np.argsort(-fractions[:, rare], kind="stable")
    written = array_of(group, "written")
    for i in rows[order[: rows.size // 2]]:
        written[int(i)] = False


def train_copies(group: zarr.Group, task: str, rows: np.ndarray) -> None:
    """Overwrite `rows` with train samples plus sensor-like noise (sd 10 DN): a memorising model."""
    train = np.flatnonzero(read(group, "split", slice(None)) == 0)
    rng = np.random.default_rng(0)
    for i, source in zip(rows, train, strict=False):
        for name in (*IMAGE_ARRAYS[task], LABEL_ARRAY[task]):
            values = read(group, name, int(source))
            if name in IMAGE_ARRAYS[task]:
                noisy = values.astype(np.float64) + rng.normal(0.0, 10.0, values.shape)
                values = np.clip(np.rint(noisy), 0, 65535).astype(values.dtype)
            array_of(group, name)[int(i)] = values


CORRUPTIONS: dict[str, Corruption] = {
    "shuffled masks": shuffle_masks,
    "spectral shift": spectral_shift,
    "blur 5x5": blur,
    "rebalanced": rebalance,
    "train copies": train_copies,
}


def corrupted_copy(store: Path, out: Path, corruption: Corruption, rows: np.ndarray) -> Path:
    """A copy of `store` with `corruption` applied to samples `rows` through the Zarr API."""
    shutil.copytree(store, out)
    group = zarr.open_group(out, mode="r+", zarr_format=3, use_consolidated=False)
    manifest = open_store(out).manifest
    corruption(group, manifest.task, rows)
    # Readers refuse a sample edited behind the writer's back as damaged; these edits are meant.
    ZarrWriter(out, manifest).checksum_again(int(i) for i in rows)
    return out


def prepare(out: Path, task: str, n: int, size: int) -> Path:
    command = [sys.executable, "-m", "specdm_cli", "prepare", "demo", "--out", str(out)]
    command += ["--task", task, "--n", str(n), "--size", str(size), "--val-fraction", "0.5"]
    subprocess.run([*command, "--quiet"], check=True)
    return out


def run(task: str, n: int, size: int, steps: int, workdir: Path) -> dict[str, QualityReport]:
    """Reports for real half B and each corrupted copy of it, against real half A."""
    store = prepare(workdir / f"demo-{task}.zarr", task, n, size)
    reference = open_store(store)
    start = time.perf_counter()
    network = load_or_train(reference, default_config(reference, steps=steps), workdir / "cache")
    print(
        f"# {task}: feature network {network.feature_hash[:12]} in {time.perf_counter() - start:.0f} s"
    )
    val = reference.indices("val")
    half_a, half_b = val[0::2], val[1::2]
    reports = {
        "real halves": compare_stores(
            reference, reference, network, reference_indices=half_a, candidate_indices=half_b
        )
    }
    for name, corruption in CORRUPTIONS.items():
        copy = open_store(
            corrupted_copy(store, workdir / f"{task}-{name}.zarr", corruption, half_b)
        )
        rows = np.intersect1d(half_b, copy.indices(None))
        reports[name] = compare_stores(
            reference, copy, network, reference_indices=half_a, candidate_indices=rows
        )
    return reports


def table(reports: dict[str, QualityReport]) -> str:
    """Scalar figures as rows, one column per comparison."""
    columns = list(reports)
    values: dict[str, list[Any]] = {}
    for column, report in enumerate(reports.values()):
        for name, value, _hash in report.figures():
            if "." in name and not name.startswith("sad_per_class"):
                continue
            values.setdefault(name, [None] * len(columns))[column] = value
    width = max(len(name) for name in values)
    lines = [f"{'metric':<{width}} " + " ".join(f"{c:>15}" for c in columns)]
    for name, row in values.items():
        cells = ["-" if v is None else f"{v:.4g}" for v in row]
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>15}" for c in cells))
    counts = " ".join(f"{r.candidate.count:>15}" for r in reports.values())
    lines.append(f"{'candidate samples':<{width}} {counts}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ss", "cd", "both"], default="both")
    parser.add_argument("--n", type=int, default=384, help="demo scenes (half held out)")
    parser.add_argument("--size", type=int, default=32, help="scene size in pixels")
    parser.add_argument("--steps", type=int, default=400, help="feature network steps")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    args = parser.parse_args()
    workdir = args.out or Path(tempfile.mkdtemp(prefix="specdm-metrics-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for task in ("ss", "cd") if args.task == "both" else (args.task,):
        reports = run(task, args.n, args.size, args.steps, workdir)
        print(f"# feature_hash {next(iter(reports.values())).feature_hash}")
        print(table(reports))
        print()


if __name__ == "__main__":
    main()
