"""The frozen segmenter of `fit-vae --semantic-weight` (issue 20 §2): trained first on the
store's train split, saved in every VAE checkpoint (safetensors + JSON), reloaded on resume."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from specdm_cli.config import Progress, VAETrainConfig
from specdm_cli.errors import ModelError
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Manifest
from specdm_cli.metrics.stats import mean_iou
from specdm_cli.models.feature_net import FeatureNetConfig, build_network
from specdm_cli.models.losses import mask_ce
from specdm_cli.pipeline.runs.checkpoints import AGAIN_FROM_THE_START
from specdm_cli.pipeline.train.common import load_batch, step_seed, to_tensors
from specdm_cli.stores import StoreReader

FOLDER = "segmenter"  # inside a checkpoint folder


def segmenter_config(manifest: Manifest, config: VAETrainConfig) -> FeatureNetConfig:
    """The metrics' compact U-Net (siamese for cd) at its defaults, for this store."""
    return FeatureNetConfig(
        task=manifest.task,
        bands=len(manifest.bands),
        classes=len(manifest.classes),
        steps=config.semantic_steps,
        seed=config.seed,
    )


class Segmenter:
    """A trained, frozen segmenter and what it scored on the val samples."""

    def __init__(self, network: nn.Module, config: FeatureNetConfig, summary: dict[str, Any]):
        self.network = network.eval().requires_grad_(False)
        self.config = config
        self.summary = summary

    def save(self, checkpoint: Path) -> None:
        folder = checkpoint / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        record = {"config": self.config.model_dump(mode="json"), "summary": self.summary}
        atomic_write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")


def load_segmenter(checkpoint: Path, device: torch.device) -> Segmenter | None:
    """The segmenter saved in a checkpoint (None if it holds none); damaged -> exit 4."""
    folder = checkpoint / FOLDER
    if not folder.is_dir():
        return None
    try:
        record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = FeatureNetConfig.model_validate(record["config"])
        network = build_network(config)
        network.load_state_dict(load_file(folder / "model.safetensors"))
        summary = dict(record["summary"])
    except (OSError, SafetensorError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"unreadable segmenter ({type(exc).__name__})", folder, AGAIN_FROM_THE_START
        ) from None
    return Segmenter(network.to(device), config, summary)


def train_segmenter(
    reader: StoreReader,
    train: np.ndarray,
    val: np.ndarray,
    config: FeatureNetConfig,
    stats: tuple[torch.Tensor, torch.Tensor],
    class_weights: torch.Tensor | None,
    progress: Progress | None = None,
) -> Segmenter:
    """Train on `train` (D4 batches drawn from (seed, step), AdamW, cosine decay), freeze, and
    score mIoU on `val`: how much a real image tells this segmenter, the most its loss on
    decoded images can ask of the VAE."""
    started = time.monotonic()
    mean, std = stats
    task = reader.manifest.task
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        network = build_network(config).to(mean.device)
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
    )
    network.train()
    for step in range(config.steps):
        rng = np.random.default_rng(step_seed(config.seed, step, "segmenter"))
        chosen = rng.choice(train, config.batch_size, replace=len(train) < config.batch_size)
        batch, _valid = to_tensors(load_batch(reader, chosen, rng), task, mean, std, mean.device)
        _features, logits = network([batch[name] for name in IMAGE_ARRAYS[task]])
        loss = mask_ce(logits, batch[LABEL_ARRAY[task]], class_weights)
        optimiser.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimiser.step()
        schedule.step()
        fault_point("segmenter.after_step")
        if progress is not None:
            progress("fit-vae segmenter", step + 1, config.steps)
    summary = {
        "train_samples": len(train),
        "steps": config.steps,
        "final_loss": float(loss.detach()),
        "val_samples": len(val),
        "val_miou": val_miou(network, reader, val, config, stats),
        "seconds": round(time.monotonic() - started, 2),
    }
    return Segmenter(network, config, summary)


@torch.no_grad()
def val_miou(
    network: nn.Module,
    reader: StoreReader,
    indices: np.ndarray,
    config: FeatureNetConfig,
    stats: tuple[torch.Tensor, torch.Tensor],
) -> float | None:
    """mIoU of the network's argmax on real samples `indices` (None without any)."""
    if not len(indices):
        return None
    network.eval()
    task, counts = reader.manifest.task, np.zeros((config.classes, config.classes), np.int64)
    for start in range(0, len(indices), config.batch_size):
        arrays = load_batch(reader, indices[start : start + config.batch_size], None)
        batch, _ = to_tensors(arrays, task, *stats, stats[0].device)
        _features, logits = network([batch[name] for name in IMAGE_ARRAYS[task]])
        truth = batch[LABEL_ARRAY[task]].cpu().numpy()
        predicted = logits.argmax(dim=1).cpu().numpy()
        keep = truth != IGNORE_INDEX
        code = truth[keep] * config.classes + predicted[keep]
        counts += np.bincount(code, minlength=config.classes**2).reshape(counts.shape)
    return float(mean_iou(counts))
