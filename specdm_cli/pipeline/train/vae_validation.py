"""Reconstruction quality of the two-stream VAE (paper Table 4): RMSE, SAD, CE, IoU per class."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Task
from specdm_cli.metrics.stats import class_iou
from specdm_cli.models.losses import denormalize, spectral_angle
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.pipeline.train.common import image_pixels, load_batch, to_tensors
from specdm_cli.stores import StoreReader


class _Totals:
    """Running sums over validation batches (valid pixels only)."""

    def __init__(self, classes: int) -> None:
        self.sq_norm = self.sq_phys = self.angle = self.pixels = 0.0
        self.ce = self.labelled = 0.0
        self.classes = classes
        # One more row and column for "decoded unlabelled" (255) on a labelled pixel: a miss.
        self.confusion = np.zeros((classes + 1, classes + 1), dtype=np.int64)

    def images(
        self,
        recon: torch.Tensor,
        target: torch.Tensor,
        valid: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
    ) -> None:
        keep = valid.unsqueeze(1).expand_as(target)
        self.sq_norm += float(((recon - target)[keep] ** 2).sum())
        phys_recon, phys_target = denormalize(recon, mean, std), denormalize(target, mean, std)
        self.sq_phys += float(((phys_recon - phys_target)[keep] ** 2).sum())
        self.angle += float(spectral_angle(phys_recon, phys_target)[valid].sum())
        self.pixels += float(valid.sum())

    def labels(self, logits: torch.Tensor, decoded: torch.Tensor, label: torch.Tensor) -> None:
        """CE of the logits and the confusion of the decoded labels (255: unlabelled) on the
        labelled pixels of `label`."""
        labelled = label != IGNORE_INDEX
        ce = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="sum")
        self.ce += float(ce)
        self.labelled += float(labelled.sum())
        predicted = decoded[labelled].cpu().numpy()
        predicted[predicted == IGNORE_INDEX] = self.classes
        truth = label[labelled].cpu().numpy()
        np.add.at(self.confusion, (truth, predicted), 1)

    def summary(self, bands: int) -> dict[str, object]:
        iou = class_iou(self.confusion)[: self.classes]
        values = max(self.pixels * bands, 1.0)
        return {
            "rmse": float(np.sqrt(self.sq_norm / values)),
            "rmse_physical": float(np.sqrt(self.sq_phys / values)),
            "sad": self.angle / max(self.pixels, 1.0),
            "ce": self.ce / max(self.labelled, 1.0),
            "iou": [None if np.isnan(v) else float(v) for v in iou],
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        }


@torch.no_grad()
def validate(
    model: SpecDMVAE,
    reader: StoreReader,
    indices: np.ndarray,
    task: Task,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
) -> dict[str, object]:
    """Reconstruct `indices` through the posterior means; Table 4's metrics, physical and normalised."""
    model.eval()
    totals = _Totals(model.config.num_classes)
    device = mean.device
    for start in range(0, len(indices), batch_size):
        batch, labelled = to_tensors(
            load_batch(reader, indices[start : start + batch_size], None), task, mean, std, device
        )
        valid = image_pixels(labelled, model.config.unlabelled_class)
        decoded = model.decode_joint(model.encode_latent(batch))
        for name in IMAGE_ARRAYS[task]:
            totals.images(decoded[name].float(), batch[name], valid, mean, std)
        logits = decoded[LABEL_ARRAY[task]].float()
        totals.labels(logits, model.labels(logits), batch[LABEL_ARRAY[task]])
    model.train()
    return totals.summary(len(mean))
