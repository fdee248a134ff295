"""Agreement relabelling (FreeMask-style, issue 20 section 3): keep a generated label only where
a segmenter trained on real pairs predicts the same class, mark the rest ignored (255).

A generated mask can disagree with its own image (the demo models' pair mIoU is below real
pairs'); training on such a pixel teaches the wrong class. A real-trained segmenter is an
independent judge of what the image shows: where it agrees with the generated label, the label
is kept, elsewhere the pixel is left out of the loss like nodata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from specdm_cli.manifest import IGNORE_INDEX, LABEL_ARRAY, Manifest

from .feature_training import SampleSource, TrainData
from .utility_training import predictions


class RelabelledSource:
    """The samples of `source` with their label array replaced by `labels[index]`."""

    def __init__(self, source: SampleSource, labels: dict[int, np.ndarray]):
        self.manifest: Manifest = source.manifest
        self.source = source
        self.labels = labels

    def read(self, index: int) -> dict[str, np.ndarray]:
        arrays = dict(self.source.read(index))
        arrays[LABEL_ARRAY[self.manifest.task]] = self.labels[int(index)]
        return arrays


def agreement_labels(generated: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The generated label where the prediction agrees, IGNORE_INDEX elsewhere (uint8)."""
    kept = np.where(generated == predicted, generated, IGNORE_INDEX)
    return kept.astype(np.uint8)


@dataclass(frozen=True)
class Relabelled:
    """Agreement labels of some samples and how many labelled pixels they keep."""

    labels: dict[int, np.ndarray]
    kept_pixels: int
    labelled_pixels: int

    @property
    def kept_share(self) -> float:
        """Share of the generated labelled (non-255) pixels the referee agreed with."""
        return self.kept_pixels / self.labelled_pixels if self.labelled_pixels else 0.0


def relabel(referee: nn.Module, data: TrainData, batch_size: int, device: str) -> Relabelled:
    """Agreement labels of every sample of `data` (one source), keyed by its store index."""
    if len(data.readers) != 1:
        raise ValueError("relabel reads one source at a time")
    labels: dict[int, np.ndarray] = {}
    kept = labelled = 0
    for start, predicted, generated in predictions(referee, data, batch_size, device):
        for offset, (guess, truth) in enumerate(zip(predicted, generated, strict=True)):
            agreed = agreement_labels(truth, guess)
            labels[data.pool[start + offset][1]] = agreed
            kept += int((agreed != IGNORE_INDEX).sum())
            labelled += int((truth != IGNORE_INDEX).sum())
    return Relabelled(labels, kept, labelled)


def relabelled_data(
    referee: nn.Module, data: TrainData, batch_size: int, device: str
) -> tuple[TrainData, float]:
    """`data` with agreement labels (same pool, same normalisation) and the share kept."""
    result = relabel(referee, data, batch_size, device)
    source = RelabelledSource(data.readers[0], result.labels)
    indices = np.array([index for _k, index in data.pool], np.int64)
    return TrainData([(source, indices)], data.mean, data.std), result.kept_share
