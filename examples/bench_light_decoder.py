"""A lighter image decoder, measured before it is built in (issue 18 §2): a narrower decoder
distilled from a run's trained one, against the trained one, side by side in one run.

    python examples/bench_light_decoder.py --real demo.zarr [--model demo] [--blocks 8,16,16]

The student is the run's image decoder with other widths (diffusers' AutoencoderKL decoder and
its post-quant conv), trained for `--steps` to reproduce the teacher's output (L1) on latents
of the real train pairs, posterior samples so that it also sees latents off the means, as a
sampler's are (TAESD-style distillation, without the adversarial term). Prints, for teacher and
student: image-decoder parameters, decode time per sample (interleaved repeats, the median; the
ratio is the figure), and the VAE's validation figures on real val with that decoder (RMSE,
SAD: fit-vae's own code; the mask branch is the same for both). The mask-aware decoder
(fit-vae --mask-aware-decoder) is not covered.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from specdm_cli.manifest import IMAGE_ARRAYS
from specdm_cli.models.vae import SpecDMVAE, build_autoencoder
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.train.common import load_batch, to_tensors
from specdm_cli.pipeline.train.vae_validation import validate
from specdm_cli.stores import StoreReader, open_store


def student_of(vae: SpecDMVAE, blocks: tuple[int, ...], layers: int, groups: int) -> Any:
    """An image autoencoder of the run's bands and latent size with other decoder widths."""
    config = vae.config
    return build_autoencoder(
        config.bands, config.bands, config.image_latent_channels, blocks, layers, groups
    )


def image_latents(vae: SpecDMVAE, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Posterior samples of the image branch for every image of the batch (cd: both phases)."""
    assert vae.image_vae is not None
    images = torch.cat([batch[name] for name in IMAGE_ARRAYS[task]], dim=0)
    sampled: torch.Tensor = vae.image_vae.encode(images).latent_dist.sample()
    return sampled


def distill(vae: SpecDMVAE, student: Any, real: StoreReader, args: argparse.Namespace) -> float:
    """Train the student's decoder on the teacher's outputs; returns the last loss."""
    task, norm = real.manifest.task, real.manifest.normalization
    assert norm is not None, "a prepared store records its normalisation"
    mean, std = torch.tensor(norm.mean), torch.tensor(norm.std)
    train = real.indices("train")
    rng = np.random.default_rng(0)
    parameters = [*student.decoder.parameters(), *student.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    loss = torch.zeros(())
    for step in range(args.steps):
        chosen = rng.choice(train, size=args.batch_size, replace=False)
        batch, _valid = to_tensors(
            load_batch(real, chosen, rng), task, mean, std, torch.device("cpu")
        )
        with torch.no_grad():
            z = image_latents(vae, batch, task)
            assert vae.image_vae is not None
            target = vae.image_vae.decode(z).sample
        loss = F.l1_loss(student.decode(z).sample, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if (step + 1) % max(args.steps // 10, 1) == 0:
            print(
                f"  step {step + 1}/{args.steps}: L1 to the teacher {loss.item():.4f}", flush=True
            )
    return loss.item()


def decoder_parameters(autoencoder: Any) -> int:
    parts = [*autoencoder.decoder.parameters(), *autoencoder.post_quant_conv.parameters()]
    return sum(p.numel() for p in parts)


@torch.no_grad()
def decode_seconds(decoders: dict[str, Any], z: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per sample of each decoder, the decoders timed in turn (interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, decoder in decoders.items():
            started = time.perf_counter()
            for part in torch.split(z, 16):  # synthesize's CPU decode chunk
                decoder.decode(part)
            times[name].append((time.perf_counter() - started) / len(z))
    return {name: statistics.median(values) for name, values in times.items()}


def figures(vae: SpecDMVAE, real: StoreReader) -> dict[str, Any]:
    norm = real.manifest.normalization
    assert norm is not None, "a prepared store records its normalisation"
    val = real.indices("val")[:256]
    return validate(vae, real, val, real.manifest.task, torch.tensor(norm.mean),
                    torch.tensor(norm.std), 16)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="the run's kind of real store")
    parser.add_argument("--model", default="demo", help="run folder, or demo")
    parser.add_argument("--blocks", default="8,16,16", help="the student decoder's widths")
    parser.add_argument("--layers", type=int, default=1, help="resnet layers per block")
    parser.add_argument("--groups", type=int, default=4, help="group-norm groups")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    real = open_store(args.real)
    chosen = choose_model(args.model, real.manifest.task)
    vae = load_vae(chosen.path, chosen.manifest, torch.device("cpu"))
    if vae.image_vae is None or vae.label_to_image is not None:
        raise SystemExit("needs a two-stream VAE without the mask-aware decoder")
    blocks = tuple(int(part) for part in args.blocks.split(","))
    student = student_of(vae, blocks, args.layers, args.groups)
    print(
        f"distilling a {blocks} x {args.layers} decoder from {chosen.path} for {args.steps} steps"
    )
    distill(vae, student, real, args)
    teacher = vae.image_vae
    before = figures(vae, real)
    trained = teacher.decoder, teacher.post_quant_conv
    # The run's encoder with the student's decoder: the VAE as it would sample with it.
    teacher.decoder, teacher.post_quant_conv = student.decoder, student.post_quant_conv
    after = figures(vae, real)
    teacher.decoder, teacher.post_quant_conv = trained
    z = torch.randn(
        64, vae.config.image_latent_channels, *(2 * [real.manifest.height // vae.config.downsample])
    )
    seconds = decode_seconds(
        {"teacher": teacher.eval(), "student": student.eval()}, z, args.repeats
    )
    print("| decoder | parameters | ms/sample | val RMSE | val SAD |")
    print("|---|---|---|---|---|")
    for name, model, result in (("teacher", teacher, before), ("student", student, after)):
        print(f"| {name} | {decoder_parameters(model)} | {1000 * seconds[name]:.2f} | {result['rmse']:.4f} | "
              f"{result['sad']:.4f} |")  # fmt: skip
    print(f"student / teacher decode time: {seconds['student'] / seconds['teacher']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
