"""Sparse labels and `fit-vae --unlabelled-class` (README, fit-vae: "Sparse labels").

    python examples/sparse_labels.py make EXPORT RAW     # a sparse copy of a GeoTIFF export
    specdm prepare geotiff RAW --splits RAW/splits.csv --out sparse.zarr
    specdm fit-vae sparse.zarr --run plain ...; specdm fit-vae sparse.zarr --run unl ... --unlabelled-class
    OMP_NUM_THREADS=1 python examples/sparse_labels.py rows sparse.zarr out.jsonl real plain unl \
        --batch-size 16 --eval-every 50 --patience 6 --max-steps 3000 --first-seed 0 --seeds 1

`make` copies an ss GeoTIFF export (`specdm prepare demo --format geotiff`): images as they
are, train and val masks kept only inside three random rectangles a scene (255 elsewhere),
test masks dense, and the export's splits as RAW/splits.csv. `rows` trains the downstream
segmenter (the benchmark's protocol, tested on the dense test masks) on the first
--real-limit real train pairs (`real`) or on their round trips through a run's VAE, decoded as
`synthesize` decodes them, with no real 255 put back (a run folder); each line of OUT also
gives the share of decoded 255 where the real label is 255 and where it is a class.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from vae_utility import add_protocol_options, protocol_options, train_seeds, vae_of

from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.models.losses import denormalize
from specdm_cli.pipeline.benchmark import downstream as ds
from specdm_cli.pipeline.benchmark import downstream_rows
from specdm_cli.pipeline.benchmark.feature_training import ArraySource, TrainData
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.train.common import load_batch, to_tensors
from specdm_cli.stores import StoreReader, open_store

RECTANGLES = 3  # labelled boxes per train/val scene


def make(export: Path, raw: Path, seed: int) -> None:
    manifest = json.loads((export / "manifest.json").read_text(encoding="utf-8"))
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    rng = np.random.default_rng(seed)
    kept = total = 0
    with (raw / "splits.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stem", "split"])
        for entry in manifest["files"]:
            files, split = entry["files"], entry["split"]
            stem = Path(files["image"]).stem
            writer.writerow([stem, split])
            os.link(export / files["image"], raw / "images" / f"{stem}.tif")
            with rasterio.open(export / files["mask"]) as src:
                profile, mask = src.profile, src.read(1)
            if split != "test":
                keep = _boxes(rng, mask.shape)
                mask = np.where(keep, mask, IGNORE_INDEX).astype(mask.dtype)
                kept, total = kept + int(keep.sum()), total + keep.size
            with rasterio.open(raw / "masks" / f"{stem}.tif", "w", **profile) as dst:
                dst.write(mask, 1)
    classes = [
        {"code": c["index"], "name": c["name"], "colour": c["colour"]} for c in manifest["classes"]
    ]
    (raw / "classes.json").write_text(json.dumps({"classes": classes}), encoding="utf-8")
    print(f"labelled share of the train and val pixels: {kept / max(total, 1):.3f}")


def _boxes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Three boxes of 14-25 pixels a side at 64 px (scaled with the scene), drawn as measured."""
    height, width = shape
    low, high = max(1, 14 * height // 64), max(2, 26 * height // 64)
    keep = np.zeros(shape, dtype=bool)
    for _ in range(RECTANGLES):
        h, w = (int(v) for v in rng.integers(low, high, 2))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        keep[y : y + h, x : x + w] = True
    return keep


def round_trips(
    real: StoreReader, run: str, indices: np.ndarray
) -> tuple[ArraySource, dict[str, float]]:
    """Round trips of `indices` decoded as `synthesize` decodes, and their shares of decoded 255
    where the real label is 255 and where it is a class."""
    chosen = vae_of(run, "ss")
    model = load_vae(chosen.path, chosen.manifest, torch.device("cpu"))
    norm = chosen.manifest.normalization
    mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
    samples: dict[int, dict[str, np.ndarray]] = {}
    counts = {"in_unlabelled": [0, 0], "in_labelled": [0, 0]}
    with torch.no_grad():
        for start in range(0, len(indices), 16):
            chunk = indices[start : start + 16]
            arrays = load_batch(real, chunk, None)
            batch, _ = to_tensors(arrays, "ss", mean, std, torch.device("cpu"))
            decoded = model.decode_joint(model.encode_latent(batch))
            labels = model.labels(decoded["mask"]).numpy().astype(np.uint8)
            images = denormalize(decoded["image"].float(), mean, std).numpy()
            for key, where in (
                ("in_unlabelled", arrays["mask"] == IGNORE_INDEX),
                ("in_labelled", arrays["mask"] != IGNORE_INDEX),
            ):
                counts[key][0] += int((labels[where] == IGNORE_INDEX).sum())
                counts[key][1] += int(where.sum())
            for k, index in enumerate(chunk.tolist()):
                samples[index] = {"image": images[k], "mask": labels[k]}
    shares = {key: hits / max(pixels, 1) for key, (hits, pixels) in counts.items()}
    return ArraySource(real.manifest, samples), shares


def rows(real: StoreReader, names: list[str], args: argparse.Namespace, out: Path) -> None:
    opts = protocol_options(args, args.real_limit)
    setup = ds.make_setup(real, opts, "cpu")
    train = downstream_rows.real_train(real, opts)
    for name in names:
        source: Any = real
        shares = None
        if name != "real":
            source, shares = round_trips(real, name, train)
        data = TrainData([(source, train)], *setup.stats)
        train_seeds(name, data, train, setup, opts, out, decoded_255_share=shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    maker = commands.add_parser("make", help="a sparse copy of a GeoTIFF export")
    maker.add_argument("export", type=Path)
    maker.add_argument("raw", type=Path)
    maker.add_argument("--seed", type=int, default=5)
    trainer = commands.add_parser("rows", help="downstream rows: real, or run folders")
    trainer.add_argument("real", type=Path, help="the prepared sparse store")
    trainer.add_argument("out", type=Path, help="JSON lines, appended to")
    trainer.add_argument("rows", nargs="+", help="real, or a run folder")
    trainer.add_argument("--real-limit", type=int, default=100)
    add_protocol_options(trainer)
    args = parser.parse_args()
    if args.command == "make":
        make(args.export, args.raw, args.seed)
        return
    torch.set_num_threads(args.threads)
    rows(open_store(args.real), args.rows, args, args.out)


if __name__ == "__main__":
    main()
