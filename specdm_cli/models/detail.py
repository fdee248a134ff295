"""Detail retrieved by example: fine detail the image VAE's decoder loses, put back from a bank
of real scenes (docs/measurements.md, "Detail retrieved from other real scenes").

A bank holds, for every `block` x `block` block of some real scenes encoded and decoded by the
run's VAE, a key (its decoded surroundings, `context` pixels square, band-normalised, projected
on their first `dims` principal components) and its residual (real - decoded, physical units).
A decoded image's block takes the residual of the bank block whose key is nearest, as
example-based super-resolution does, looked up among the bank blocks whose real label's majority
class is the class the image's mask draws there: a road block takes road detail, not the field
texture its surroundings may look like (docs/measurements.md, "Matched within the class the mask
draws"). Built once (`specdm fit-detail`), saved in the run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from specdm_cli.manifest import IGNORE_INDEX

# Bank blocks scored at once: the (blocks x chunk) scores stay in the cache. Measured on one core
# for a 64 x 64 image and the 76,800-block bank: 67 ms against 172 ms for one torch.cdist.
_KEY_CHUNK = 2048
_PCA_ROWS = 20_000  # surroundings the principal components are fitted on
NO_CLASS = -1  # a block without a labelled pixel: looked up among every bank block


@dataclass(frozen=True)
class Lookup:
    block: int = 4
    context: int = 8
    dims: int = 48


@dataclass
class Bank:
    """Projected decoded surroundings (keys) and residual blocks of the bank's scenes."""

    lookup: Lookup
    mean: torch.Tensor  # (C, 1, 1) band means, physical units
    std: torch.Tensor
    centre: torch.Tensor  # (F,) surroundings' mean before projection
    basis: torch.Tensor  # (F, dims)
    keys: torch.Tensor  # (N, dims)
    residuals: torch.Tensor  # (C * block * block, N)
    classes: torch.Tensor  # (N,) each block's majority class, NO_CLASS where it has no label

    def features(self, decoded: torch.Tensor) -> torch.Tensor:
        """(C, H, W) physical -> (blocks, dims) projected surroundings of every block."""
        return (surroundings(decoded, self.mean, self.std, self.lookup) - self.centre) @ self.basis

    def __post_init__(self) -> None:
        # Blocks sorted by class (stably, so a bank's order is its own), so that each class's
        # blocks are one slice of the keys: a class-matched lookup scans only that slice.
        order = torch.argsort(self.classes, stable=True)
        self.keys, self.residuals = self.keys[order], self.residuals[:, order]
        self.classes = self.classes[order]
        self.key_norms = self.keys.pow(2).sum(dim=1)
        values, counts = torch.unique_consecutive(self.classes, return_counts=True)
        ends = counts.cumsum(0).tolist()
        self.pools = {int(v): slice(e - n, e) for v, n, e in zip(values, counts, ends, strict=True)}

    def nearest(self, decoded: torch.Tensor, wanted: torch.Tensor | None = None) -> torch.Tensor:
        """(blocks,) the bank block whose key is nearest each block's; with `wanted` (each
        block's class), the nearest of that class (of any where the bank has none of it)."""
        query = self.features(decoded)
        everything = slice(0, len(self.keys))
        if wanted is None:
            return self._nearest_in(query, everything)
        chosen = torch.empty(len(query), dtype=torch.long)
        for value in torch.unique(wanted).tolist():
            where = wanted == value
            chosen[where] = self._nearest_in(query[where], self.pools.get(value, everything))
        return chosen

    def _nearest_in(self, query: torch.Tensor, pool: slice) -> torch.Tensor:
        """(queries,) the nearest key of the bank blocks `pool`, scored a chunk at a time."""
        best = torch.full((len(query),), torch.inf)
        chosen = torch.zeros(len(query), dtype=torch.long)
        for start in range(pool.start, pool.stop, _KEY_CHUNK):
            part = slice(start, min(start + _KEY_CHUNK, pool.stop))
            # |q - k|^2 less |q|^2, which is the same for every k: one matrix product.
            scores = torch.addmm(self.key_norms[part], query, self.keys[part].T, alpha=-2)
            value, index = scores.min(dim=1)
            nearer = value < best
            best = torch.where(nearer, value, best)
            chosen = torch.where(nearer, index + start, chosen)
        return chosen

    def detail(
        self,
        decoded: torch.Tensor,
        mask: torch.Tensor | None = None,
        chosen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(C, H, W) residual to add to a decoded image: each block's nearest bank block's
        within the class `mask` (H, W) draws there (any class without a mask), or the bank
        blocks `chosen` (one per block)."""
        if chosen is None:
            wanted = None if mask is None else block_classes(mask, self.lookup.block)
            chosen = self.nearest(decoded, wanted)
        height, width = decoded.shape[1:]
        size = self.lookup.block
        blocks = self.residuals[:, chosen][None]
        return F.fold(blocks, (height, width), kernel_size=size, stride=size)[0]

    def detail_of_batch(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) residuals for a batch of decoded images, each looked up within the
        classes its (H, W) mask draws."""
        return torch.stack([self.detail(i, m) for i, m in zip(images, masks, strict=True)])

    @property
    def stored_bytes(self) -> int:
        """The bank's keys, residuals and classes on disk: the file less its header and its
        float32 statistics and basis (0.1 MB at the defaults)."""
        return 2 * (self.keys.numel() + self.residuals.numel() + self.classes.numel())

    def save(self, path: Path) -> None:
        tensors = {"mean": self.mean, "std": self.std, "centre": self.centre,
                   "basis": self.basis, "keys": self.keys.half(),
                   "residuals": self.residuals.half(), "classes": self.classes.short()}  # fmt: skip
        save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"lookup": json.dumps(asdict(self.lookup))})  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Bank:
        """The bank saved at `path` (OSError/SafetensorError/KeyError/ValueError if damaged)."""
        lookup = check_bank_file(path)
        tensors = load_file(path)
        return cls(lookup, tensors["mean"], tensors["std"], tensors["centre"], tensors["basis"],
                   tensors["keys"].float(), tensors["residuals"].float(),
                   tensors["classes"].long())  # fmt: skip


def _float16_values(values: torch.Tensor) -> torch.Tensor:
    """`values` (float32) rounded to float16; a residual past float16's range (65,504, no
    real one) is clipped to it rather than stored as infinity."""
    largest = torch.finfo(torch.float16).max
    return values.float().clamp(-largest, largest).half().float()


def check_bank_file(path: Path) -> Lookup:
    """The lookup of the bank saved at `path`, read from its header (errors as `Bank.load`)."""
    with safe_open(str(path), "pt") as handle:
        lookup = Lookup(**json.loads((handle.metadata() or {})["lookup"]))
        if "classes" not in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            raise ValueError("built before class-matched lookups: it has no block classes")
    return lookup


def surroundings(
    image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lookup: Lookup
) -> torch.Tensor:
    """(blocks, C * context^2): the band-normalised pixels around each block, edges reflected."""
    pad = (lookup.context - lookup.block) // 2
    normalised = ((image - mean) / std)[None]
    padded = F.pad(normalised, (pad, pad, pad, pad), mode="reflect")
    return F.unfold(padded, lookup.context, stride=lookup.block)[0].T


def block_classes(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(blocks,) each `block` x `block` block's majority class in the (H, W) label `mask`
    (the lowest on a tie), NO_CLASS where no pixel has a label."""
    labels = mask.long()
    labelled = labels != IGNORE_INDEX
    count = int(labels[labelled].max()) + 1 if labelled.any() else 1
    onehot = F.one_hot(labels.where(labelled, count), count + 1)[..., :count]
    votes = F.unfold(onehot.permute(2, 0, 1)[None].float(), block, stride=block)[0]
    votes = votes.view(count, block * block, -1).sum(dim=1)
    majority = votes.argmax(dim=0)
    return majority.where(votes.sum(dim=0) > 0, NO_CLASS)


def build_bank(
    scenes: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    std: torch.Tensor,
    lookup: Lookup,
) -> Bank:
    """The bank of (decoded, real, label) scenes, images (C, H, W) in physical units, labels
    (H, W); mean and std are the run's band statistics, shaped (C, 1, 1)."""
    features, residuals, classes = [], [], []
    for decoded, truth, label in scenes:
        features.append(surroundings(decoded, mean, std, lookup))
        residual = (truth - decoded)[None]
        residuals.append(F.unfold(residual, lookup.block, stride=lookup.block)[0])
        classes.append(block_classes(label, lookup.block))
    stacked = torch.cat(features)
    centre = stacked.mean(dim=0)
    order = torch.randperm(len(stacked), generator=torch.Generator().manual_seed(0))
    _, _, vectors = torch.linalg.svd(stacked[order[:_PCA_ROWS]] - centre, full_matrices=False)
    basis = vectors[: lookup.dims].T.contiguous()
    keys = (stacked - centre) @ basis
    # Keys and residuals are saved as float16 (half the file: docs/measurements.md, "A bank in
    # float16"), so they are rounded to it here: the bank built is the bank read back.
    return Bank(lookup, mean, std, centre, basis, _float16_values(keys),
                _float16_values(torch.cat(residuals, dim=1)), torch.cat(classes))  # fmt: skip
