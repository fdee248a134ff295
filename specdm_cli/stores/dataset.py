"""A torch Dataset over one or several stores of either format (real and synthetic alike)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from specdm_cli.errors import InputDataError
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY, SPLITS
from specdm_cli.stores import StoreReader, open_store

Layout = Literal["specdm", "torchgeo"]


class StoreDataset(Dataset[dict[str, Any]]):
    """Samples as dicts keyed by the store's array names (`image`, `mask`, ...).

    Several stores can be joined (they must share task, bands and size); each sample then
    carries `origin`, the index of its store. `layout="torchgeo"` gives torchgeo's shapes:
    ss `image` [C,H,W] and `mask` [H,W]; cd `image` [2,C,H,W] and `mask` [1,H,W].
    """

    def __init__(
        self,
        stores: Path | Sequence[Path],
        split: str | None = None,
        layout: Layout = "specdm",
        allow_incomplete: bool = False,
    ):
        paths = [stores] if isinstance(stores, Path) else list(stores)
        self.readers: list[StoreReader] = [open_store(p, allow_incomplete) for p in paths]
        _check_compatible(self.readers)
        self.layout = layout
        self.task = self.readers[0].manifest.task
        _check_split_name(split)
        self.entries = [
            (origin, int(index))
            for origin, reader in enumerate(self.readers)
            for index in reader.indices(split)
        ]
        if split is not None and not self.entries:  # a synthetic store has no "train" split
            raise InputDataError(
                f"no {split!r} samples (splits here: {_split_counts(self.readers)})",
                self.readers[0].root,
                "choose one of those splits, or split=None for every sample",
            )
        self.multiple = len(self.readers) > 1

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: int) -> dict[str, Any]:
        origin, index = self.entries[item]
        arrays = self.readers[origin].read(index)
        sample: dict[str, Any] = {name: _tensor(values) for name, values in arrays.items()}
        if self.layout == "torchgeo":
            sample = _torchgeo_layout(sample, self.task)
        sample["index"] = index
        if self.multiple:
            sample["origin"] = origin
        return sample


def _check_split_name(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is none of {', '.join(SPLITS)}")


def _split_counts(readers: list[StoreReader]) -> str:
    names, counts = np.unique(
        np.concatenate([reader.splits()[reader.written()] for reader in readers]),
        return_counts=True,
    )
    return ", ".join(f"{name} {count}" for name, count in zip(names, counts, strict=True)) or "none"


def _tensor(values: np.ndarray) -> torch.Tensor:
    if values.ndim == 2:
        return torch.from_numpy(values.astype(np.int64))
    return torch.from_numpy(values.astype(np.float32))


def _torchgeo_layout(sample: dict[str, Any], task: str) -> dict[str, Any]:
    if task == "ss":
        return sample
    images = torch.stack([sample.pop(name) for name in IMAGE_ARRAYS["cd"]])
    change = sample.pop(LABEL_ARRAY["cd"]).unsqueeze(0)
    return {"image": images, "mask": change}


def _check_compatible(readers: list[StoreReader]) -> None:
    first = readers[0].manifest
    for reader in readers[1:]:
        other = reader.manifest
        same = (other.task, [b.name for b in other.bands], other.height, other.width) == (
            first.task,
            [b.name for b in first.bands],
            first.height,
            first.width,
        )
        if not same:
            raise InputDataError(
                "stores differ in task, bands or size and cannot be joined",
                reader.root,
                f"join only stores like {readers[0].root}",
            )
