"""What the image stream's ceiling loses (docs/measurements.md: "What the image stream loses is fine
detail"): the downstream segmenter trained on the real masks of the first --real-limit train
pairs, with images made from the same real images in four ways through a run's VAE.

    OMP_NUM_THREADS=1 python examples/image_detail.py --real demo.zarr demo out.jsonl \
        --batch-size 16 --eval-every 50 --patience 6 --max-steps 3000 --first-seed 0 --seeds 1

Rows (`--rows`, all by default): `decoded` (the round trip's images), `noise` (decoded plus
Gaussian noise with the band covariance of the real val residual, real - decoded, per pixel),
`blur` (the real images, Gaussian-blurred with sigma `--sigma` pixels) and `detail` (decoded,
blurred, plus the real image's detail, real - blurred real). The protocol is the benchmark's
(`pipeline/benchmark/downstream.py`), each seed's mIoU on the real test split; one JSON line
per row and seed is appended to OUT as soon as it is done, then mean ± std per row is printed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from vae_utility import add_protocol_options, protocol_options, train_seeds, vae_of

from specdm_cli.pipeline.benchmark import downstream as ds
from specdm_cli.pipeline.benchmark import downstream_rows
from specdm_cli.pipeline.benchmark.feature_training import ArraySource, TrainData
from specdm_cli.pipeline.benchmark.generator import round_trip
from specdm_cli.stores import StoreReader, open_store

ROWS = ("decoded", "noise", "blur", "detail")
_RESIDUAL_SAMPLES = 256  # real val pairs the residual's covariance is measured on


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(C, H, W) Gaussian-blurred band by band (reflected edges), float32."""
    radius = max(1, int(np.ceil(3 * sigma)))
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    kernel /= kernel.sum()
    bands = torch.from_numpy(np.asarray(image, np.float64))[:, None]
    bands = F.pad(bands, (radius, radius, radius, radius), mode="reflect")
    bands = F.conv2d(F.conv2d(bands, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    blurred: np.ndarray = bands[:, 0].numpy().astype(np.float32)
    return blurred


def residual_factor(real: StoreReader, model: str) -> np.ndarray:
    """Cholesky factor of the band covariance of real - decoded over real val pixels."""
    val = real.indices("val")[:_RESIDUAL_SAMPLES]
    trips = round_trip(vae_of(model, real.manifest.task), real, val, torch.device("cpu"))
    residuals = [
        (real.read(int(i))["image"] - trips.read(int(i))["image"]).reshape(
            len(real.manifest.bands), -1
        )
        for i in val
    ]
    covariance = np.cov(np.concatenate(residuals, axis=1).astype(np.float64))
    factor: np.ndarray = np.linalg.cholesky(covariance + 1e-6 * np.eye(len(covariance)))
    return factor


def row_images(
    row: str, real: StoreReader, model: str, sigma: float
) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray]:
    """The row's image of pair i from its real and decoded images."""
    if row == "decoded":
        return lambda _i, _real, decoded: decoded
    if row == "blur":
        return lambda _i, real_image, _decoded: blur(real_image, sigma)
    if row == "detail":
        return lambda _i, real_image, decoded: (
            blur(decoded, sigma) + (real_image - blur(real_image, sigma))
        )
    factor = residual_factor(real, model)

    def noisy(i: int, _real: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        normal = np.random.default_rng(i).standard_normal((len(factor), decoded[0].size))
        return decoded + (factor @ normal).reshape(decoded.shape).astype(np.float32)

    return noisy


def measure(
    real: StoreReader, model: str, args: argparse.Namespace, rows: list[str], out: Path
) -> None:
    opts = protocol_options(args, args.real_limit)
    setup = ds.make_setup(real, opts, "cpu")
    train = downstream_rows.real_train(real, opts)
    trips = round_trip(vae_of(model, real.manifest.task), real, train, torch.device("cpu"))
    for row in rows:
        make = row_images(row, real, model, args.sigma)
        samples = {}
        for i in train.tolist():
            truth = real.read(i)
            image = make(i, truth["image"].astype(np.float32), trips.read(i)["image"])
            samples[i] = {"image": image, "mask": truth["mask"]}
        data = TrainData([(ArraySource(real.manifest, samples), train)], *setup.stats)
        train_seeds(row, data, train, setup, opts, out)


def summary(out: Path) -> None:
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row in dict.fromkeys(r["row"] for r in records):
        miou = np.array([r["miou"] for r in records if r["row"] == row])
        spread = miou.std(ddof=1) if miou.size > 1 else 0.0
        print(
            f"{row}: mIoU {miou.mean():.3f} ± {spread:.3f} ({', '.join(f'{v:.3f}' for v in miou)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a run folder, or demo")
    parser.add_argument("out", type=Path, help="JSON lines, appended to")
    parser.add_argument("--real", type=Path, required=True, help="real ss store (train/val/test)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--sigma", type=float, default=1.0, help="blur, in pixels")
    parser.add_argument("--real-limit", type=int, default=100)
    add_protocol_options(parser)
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if not rows or set(rows) - set(ROWS):
        parser.error(f"--rows: choose among {', '.join(ROWS)}")
    torch.set_num_threads(args.threads)
    real = open_store(args.real)
    if real.manifest.task != "ss":
        parser.error("the rows put real masks beside one image: an ss store")
    measure(real, args.model, args, rows, args.out)
    summary(args.out)


if __name__ == "__main__":
    main()
