"""Deterministic training of the feature network on a reference store's train split."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn

from specdm_cli.config import Progress
from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Manifest
from specdm_cli.metrics.masks import mask_feature_dims, mask_features
from specdm_cli.metrics.stats import MomentAccumulator
from specdm_cli.models.feature_net import FeatureNetConfig, build_network
from specdm_cli.models.losses import class_weights_auto
from specdm_cli.pipeline.train.common import d4
from specdm_cli.stores import StoreReader

# Training data is held in memory below this size, else read from the store at every step.
PRELOAD_BYTES = 512 * 2**20
# Standardisation floors: an image feature dimension is never scaled up by more than 1e6, and a
# mask feature (a pixel fraction) that hardly varies on train counts as varying by 1% of pixels.
IMAGE_STD_FLOOR = 1e-6
MASK_STD_FLOOR = 0.01


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seeded, deterministic torch inside the block; global RNG and flags restored after."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: an op with no deterministic kernel on some device warns rather than fails.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class SampleSource(Protocol):
    """What training reads samples from: a store, or pairs derived in memory (`ArraySource`)."""

    manifest: Manifest

    def read(self, index: int) -> dict[str, np.ndarray]: ...


class ArraySource:
    """Samples held in memory and read like a store (e.g. VAE round trips of real pairs)."""

    def __init__(self, manifest: Manifest, samples: dict[int, dict[str, np.ndarray]]):
        self.manifest = manifest
        self.samples = samples

    def read(self, index: int) -> dict[str, np.ndarray]:
        return self.samples[int(index)]


class TrainData:
    """Samples of one or more stores, band-normalised; held in memory when small, else read per batch.

    A sample is addressed by its position in the pool (the sources' indices, one after another),
    so a batch is the same whatever store each sample comes from.
    """

    def __init__(
        self,
        sources: Sequence[tuple[SampleSource, np.ndarray]],
        mean: np.ndarray,
        std: np.ndarray,
    ):
        self.mean, self.std = mean, std
        self.readers = [reader for reader, _ in sources]
        self.pool = [(k, int(i)) for k, (_, indices) in enumerate(sources) for i in indices]
        manifest = self.readers[0].manifest
        phases = len(IMAGE_ARRAYS[manifest.task])
        size = len(self.pool) * phases * len(manifest.bands) * manifest.height * manifest.width
        self.cache: dict[int, tuple[list[np.ndarray], np.ndarray]] | None = (
            {} if size * 4 <= PRELOAD_BYTES else None
        )

    def __len__(self) -> int:
        return len(self.pool)

    def sample(self, position: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(normalised images per phase, int64 labels) of pool entry `position`."""
        if self.cache is not None and position in self.cache:
            return self.cache[position]
        source, index = self.pool[position]
        reader = self.readers[source]
        arrays = reader.read(index)
        task = reader.manifest.task
        images = [
            ((arrays[name] - self.mean[:, None, None]) / self.std[:, None, None]).astype(np.float32)
            for name in IMAGE_ARRAYS[task]
        ]
        item = (images, arrays[LABEL_ARRAY[task]].astype(np.int64))
        if self.cache is not None:
            self.cache[position] = item
        return item

    def batch(self, rng: np.random.Generator, size: int) -> tuple[list[Tensor], Tensor]:
        """A random batch with one random flip/rotation (drawn from `rng`, so reproducible)."""
        chosen = rng.choice(len(self.pool), size, replace=len(self.pool) < size)
        items = [self.sample(int(i)) for i in chosen]
        phases = len(items[0][0])
        images = [np.stack([it[0][p] for it in items]) for p in range(phases)]
        labels = np.stack([it[1] for it in items])
        square = labels.shape[-1] == labels.shape[-2]
        turns, flip = int(rng.integers(4)) if square else 0, bool(rng.random() < 0.5)
        # The one D4 of the project (fit-vae's batches use it too); contiguous copies keep the
        # convolutions on their fast path.
        augmented = [torch.from_numpy(d4(x, turns, flip)) for x in images]
        return augmented, torch.from_numpy(d4(labels, turns, flip))


def train_split_data(reader: StoreReader, mean: np.ndarray, std: np.ndarray) -> TrainData:
    """The train split of `reader` as TrainData; an empty train split is an input error."""
    indices = reader.indices("train")
    if indices.size == 0:
        raise InputDataError(
            "reference store has no train samples to fit the feature network",
            reader.root,
            "use a store with a train split",
        )
    return TrainData([(reader, indices)], mean, std)


def class_weights(reference: StoreReader, classes: int) -> Tensor:
    """Cross-entropy weights 1 / sqrt(train pixel fraction), mean 1 over present classes.

    Without them a rare class (cd change pixels are ~2% of the demo) is never predicted after a
    short training, and pair consistency would then measure nothing about it. Classes absent from
    train get the largest weight; a store without train fractions gets uniform weights.
    """
    fractions = reference.manifest.class_pixel_fraction.get("train", [])
    if len(fractions) != classes or not any(f > 0 for f in fractions):
        return torch.ones(classes)
    return class_weights_auto(fractions)


def fit(
    config: FeatureNetConfig,
    data: TrainData,
    weights: Tensor,
    device: str = "cpu",
    progress: Progress | None = None,
    stage: str = "train features",
) -> tuple[nn.Module, list[float]]:
    """Train a fresh network of `config` on `data`: fixed steps, seed, batches and cosine decay.

    Everything random is drawn from `config.seed`, so two calls with the same config and the
    same pool train the same weights (what makes downstream rows comparable).

    Returns:
        (the model, left in train mode; the loss of every step).
    """
    rng = np.random.default_rng(config.seed)
    weights = weights.to(device)
    losses: list[float] = []
    with deterministic(config.seed):
        model = build_network(config).to(device)
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
        )
        model.train()
        for step in range(config.steps):
            images, labels = data.batch(rng, config.batch_size)
            _features, logits = model([x.to(device) for x in images])
            target = labels.to(device)
            loss = F.cross_entropy(logits, target, weight=weights, ignore_index=IGNORE_INDEX)
            optimiser.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(stage, step + 1, config.steps)
    return model, losses


def train_network(
    reference: StoreReader,
    config: FeatureNetConfig,
    band_mean: np.ndarray,
    band_std: np.ndarray,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[nn.Module, dict[str, np.ndarray], dict[str, Any]]:
    """Train the feature network on the reference train split: fixed steps, seed and batches.

    Returns:
        (the model in eval mode; the feature standardisation fitted on the train split; a
        summary: train samples, mean loss of the last 10% of steps, seconds, device).
    """
    data = train_split_data(reference, band_mean, band_std)
    start = time.perf_counter()
    weights = class_weights(reference, config.classes)
    model, losses = fit(config, data, weights, device, progress)
    scales = _fit_scales(model, data, config, device)
    tail = losses[-max(1, len(losses) // 10) :]
    summary = {
        "train_samples": len(data),
        "final_loss": float(np.mean(tail)),
        "train_seconds": round(time.perf_counter() - start, 2),
        "device": device,
        "torch_version": torch.__version__,
    }
    return model, scales, summary


def _fit_scales(
    model: nn.Module, data: TrainData, config: FeatureNetConfig, device: str
) -> dict[str, np.ndarray]:
    """Per-dimension mean and std of image and mask features over the reference train split.

    Features are standardised with these, so FD is in units of the train spread and KID's
    cubic kernel sees values of order 1, as it does with Inception features. cd: both phases
    share one standardisation (one feature space for t1 and t2).
    """
    image = MomentAccumulator(config.feature_dim)
    mask = MomentAccumulator(mask_feature_dims(config.classes))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), config.batch_size):
            items = [
                data.sample(i) for i in range(start, min(start + config.batch_size, len(data)))
            ]
            phases = [
                torch.from_numpy(np.stack([it[0][p] for it in items])).to(device)
                for p in range(len(items[0][0]))
            ]
            features, _logits = model(phases)
            for values in features:
                image.add(values.double().cpu().numpy())
            mask.add(mask_features(np.stack([it[1] for it in items]), config.classes))
    return {
        "image_mean": image.mean,
        "image_std": np.maximum(np.sqrt(np.diag(image.covariance())), IMAGE_STD_FLOOR),
        "mask_mean": mask.mean,
        "mask_std": np.maximum(np.sqrt(np.diag(mask.covariance())), MASK_STD_FLOOR),
    }
