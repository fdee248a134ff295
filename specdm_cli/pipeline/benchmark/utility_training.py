"""Downstream training to convergence: fixed real share per batch, early stopping on real val pairs.

One rule for every configuration of the utility table (issue 20, section 1): evaluate the val
mIoU every `eval_every` steps, stop after `patience` evaluations without a new best (or at
`max_steps`), and hand back the best-val weights, kept in memory. A fixed step count instead
would compare models at different distances from convergence: real only went 0.867 -> 0.930
from 300 to 600 steps while a mix, seeing each real pair half as often, lagged further.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor, nn

from specdm_cli.config import DownstreamOptions, Progress
from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.metrics.stats import mean_iou
from specdm_cli.models.feature_net import FeatureNetConfig, build_network

from .feature_training import TrainData, deterministic


@dataclass(frozen=True)
class Batches:
    """Where a training batch comes from: `real_per_batch` pairs of `real`, the rest of `synthetic`.

    A mix keeps the real part of every batch as large as a real-only batch, so each real pair is
    drawn as often per step as in real-only training, and the synthetic part is added on top at a
    fixed share (`DownstreamOptions.real_share`).
    """

    real: TrainData | None
    synthetic: TrainData | None
    real_per_batch: int
    synthetic_per_batch: int

    def draw(self, rng: np.random.Generator) -> tuple[list[Tensor], Tensor]:
        """One batch: its real part first, then its synthetic part (each with its own flip/turn)."""
        parts = [
            data.batch(rng, size)
            for data, size in ((self.real, self.real_per_batch),
                               (self.synthetic, self.synthetic_per_batch))
            if data is not None and size > 0
        ]  # fmt: skip
        images = [torch.cat([p[0][k] for p in parts]) for k in range(len(parts[0][0]))]
        return images, torch.cat([p[1] for p in parts])


def synthetic_per_batch(options: DownstreamOptions) -> int:
    """Synthetic pairs beside a whole real batch so that real pairs make `real_share` of it."""
    share = options.real_share
    return max(1, round(options.batch_size * (1.0 - share) / share)) if share < 1 else 0


def batches_of(
    real: TrainData | None, synthetic: TrainData | None, options: DownstreamOptions
) -> Batches:
    """Real only or synthetic only: whole batches of it; a mix: B real + B (1 - s) / s synthetic."""
    size = options.batch_size
    if real is None or synthetic is None:
        return Batches(real, synthetic, size if real else 0, size if synthetic else 0)
    return Batches(real, synthetic, size, synthetic_per_batch(options))


@dataclass
class Phase:
    """What one training phase did: steps run, the best val step and score, the val curve."""

    steps: int = 0
    best_step: int = 0
    best_val: float = -1.0
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def confusion(
    model: nn.Module, data: TrainData, classes: int, batch_size: int, device: str
) -> np.ndarray:
    """(K, K) confusion of truth (rows) vs prediction over the labelled pixels of all of `data`."""
    counts = np.zeros((classes, classes), np.int64)
    for _start, predicted, truth in predictions(model, data, batch_size, device):
        valid = truth != IGNORE_INDEX
        code = truth[valid] * classes + predicted[valid]
        counts += np.bincount(code, minlength=classes * classes).reshape(classes, classes)
    return counts


@torch.inference_mode()
def predictions(
    model: nn.Module, data: TrainData, batch_size: int, device: str
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first pool position, predicted labels, stored labels) of `data`, one batch at a time,
    with `model` in eval mode (its training mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(data), batch_size):
            items = [data.sample(i) for i in range(start, min(start + batch_size, len(data)))]
            images = [
                torch.from_numpy(np.stack([it[0][p] for it in items])).to(device)
                for p in range(len(items[0][0]))
            ]
            _features, logits = model(images)
            predicted = logits.argmax(dim=1).cpu().numpy().astype(np.int64)
            yield start, predicted, np.stack([it[1] for it in items])
    finally:
        model.train(was_training)


def new_model(config: FeatureNetConfig, device: str) -> nn.Module:
    """A fresh network, initialised from `config.seed` alone."""
    with deterministic(config.seed):
        return build_network(config).to(device)


def train_to_best(
    model: nn.Module,
    batches: Batches,
    val: TrainData,
    config: FeatureNetConfig,
    options: DownstreamOptions,
    weights: Tensor,
    device: str,
    progress: tuple[Progress, str] | None = None,
) -> Phase:
    """Train `model` in place until val mIoU stops improving; leaves the best-val weights loaded.

    A constant learning rate: a decay schedule needs the length of training in advance, which
    early stopping decides. With `options.lr_drops`, a plateau first goes back to the best-val
    weights at a tenth of the rate (as many times), then stops. Everything random comes from
    `config.seed`.
    """
    rng = np.random.default_rng(config.seed)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    phase, best, start, waited = Phase(), _snapshot(model), time.perf_counter(), 0
    drops = options.lr_drops
    with deterministic(config.seed):
        model.train()
        while phase.steps < options.max_steps:
            if waited >= options.patience:
                if not drops:
                    break
                drops, waited = drops - 1, 0
                model.load_state_dict(best)
                for group in optimiser.param_groups:
                    group["lr"] *= 0.1
            _step(model, optimiser, batches.draw(rng), weights, device)
            phase.steps += 1
            if phase.steps % options.eval_every and phase.steps < options.max_steps:
                continue
            score = mean_iou(confusion(model, val, config.classes, config.batch_size, device))
            phase.curve.append((phase.steps, float(score)))
            waited += 1
            if score > phase.best_val:
                phase.best_val, phase.best_step, best, waited = (
                    float(score),
                    phase.steps,
                    _snapshot(model),
                    0,
                )
            if progress is not None:
                progress[0](progress[1], phase.steps, options.max_steps)
    model.load_state_dict(best)
    phase.seconds = round(time.perf_counter() - start, 2)
    return phase


def _step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    batch: tuple[Sequence[Tensor], Tensor],
    weights: Tensor,
    device: str,
) -> None:
    images, labels = batch
    if not bool((labels != IGNORE_INDEX).any()):
        return  # nothing labelled (e.g. relabelling kept no pixel of it): the loss would be 0/0
    _features, logits = model([x.to(device) for x in images])
    loss = F.cross_entropy(
        logits, labels.to(device), weight=weights.to(device), ignore_index=IGNORE_INDEX
    )
    optimiser.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    optimiser.step()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the weights and BatchNorm statistics (the best checkpoint, kept in memory)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
