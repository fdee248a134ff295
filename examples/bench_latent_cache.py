"""Diffusion training steps/s with the latent cache vs encoding every batch through the VAE.

Both paths run the same U-Net step on the same device in one process; the ratio is what the
cache buys: 1 + (read, augment and encode a batch) / (U-Net step), so it depends on the two
networks' sizes. Pass a run whose VAE is trained (e.g. from examples/train_demo_models.sh), or
let the script make one on a demo store with the tool's default VAE (a few steps: the weights do
not change the speed); the U-Net is the preset for the latent size unless --unet-blocks.

    python examples/bench_latent_cache.py [RUN] [--steps 30] [--batch-size 16] [--gpus 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specdm_cli.config import DiffusionTrainConfig, parse_devices
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs.run_manifest import load_run
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.train.common import d4, load_batch, step_seed, to_tensors
from specdm_cli.pipeline.train.diffusion_trainer import DiffusionTrainer
from specdm_cli.pipeline.train.fit_diffusion import unet_config
from specdm_cli.pipeline.train.latent_cache import cache_key, open_or_build
from specdm_cli.stores import open_store, store_sha256


def tiny_run(work: Path, size: int) -> Path:
    store, run = work / "demo.zarr", work / "run"
    subprocess.run(
        [
            "specdm",
            "prepare",
            "demo",
            "--n",
            "128",
            "--size",
            str(size),
            "--out",
            str(store),
            "--quiet",
        ],
        check=True,
    )
    fit = ["specdm", "fit-vae", str(store), "--run", str(run), "--steps", "2", "--quiet"]
    subprocess.run(fit, check=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpus", default=None)
    parser.add_argument("--size", type=int, default=64, help="tile size of the tiny demo run")
    parser.add_argument("--unet-blocks", default=None, help="U-Net widths [the preset]")
    args = parser.parse_args()
    device = torch_devices(parse_devices(args.gpus).one("bench_latent_cache"))[0]
    run = args.run or tiny_run(Path(tempfile.mkdtemp(prefix="specdm-cache-")), args.size)
    manifest = load_run(run)
    reader = open_store(Path(manifest.source_store))
    vae = load_vae(run, manifest, device)
    indices = reader.indices("train")
    started = time.perf_counter()
    key = cache_key(manifest.stages["vae"].weights, store_sha256(reader.root), "d4")
    cache = open_or_build(run, vae, reader, manifest.normalization, indices, key, True, 64)
    build = time.perf_counter() - started
    blocks = tuple(int(b) for b in args.unet_blocks.split(",")) if args.unet_blocks else None
    config = DiffusionTrainConfig(batch_size=args.batch_size, lr=1e-4, block_out_channels=blocks)
    trainer = DiffusionTrainer(
        cache,
        config,
        unet_config(config, cache.mean.shape[1], manifest.height // vae.config.downsample),
        device,
    )
    cached = _time(lambda step: trainer.step(step), args.steps, device)
    stats = reader.manifest.normalization
    assert stats is not None
    mean, std = torch.tensor(stats.mean, device=device), torch.tensor(stats.std, device=device)

    def on_the_fly(step: int) -> None:
        rng = np.random.default_rng(step_seed(0, step, "batch"))
        chosen = rng.choice(indices, args.batch_size)
        batch = load_batch(reader, chosen, None)
        batch = {
            k: np.stack([d4(v, int(rng.integers(4)), bool(rng.integers(2))) for v in values])
            for k, values in batch.items()
        }
        tensors, _ = to_tensors(batch, reader.manifest.task, mean, std, device)
        with torch.no_grad():
            vae.encode_latent(tensors, sample=True)
        trainer.step(step)

    fly = _time(on_the_fly, args.steps, device)
    widths = (vae.config.image_block_out_channels, vae.config.mask_block_out_channels)
    print(
        f"device {device}; {manifest.height} px tiles; B {args.batch_size}; VAE image/mask "
        f"{widths[0]}/{widths[1]}; U-Net {trainer.unet.config.block_out_channels}"
    )
    print(f"cache of {len(cache)} views built in {build:.1f} s")
    print(
        f"| path | steps/s |\n|---|---:|\n| latent cache | {cached:.2f} |\n| encode on the fly | {fly:.2f} |"
    )
    print(f"ratio cache / on the fly: {cached / fly:.2f}x")


def _time(step: object, steps: int, device: torch.device) -> float:
    run_step = step  # a callable taking the step number
    run_step(0)  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for number in range(1, steps + 1):
        run_step(number)  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
