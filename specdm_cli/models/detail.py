"""Detail retrieved by example: fine detail the image VAE's decoder loses, put back from a bank
of real scenes (docs/measurements.md, "Detail retrieved from other real scenes").

A bank holds, for every `block` x `block` block of some real scenes encoded and decoded by the
run's VAE, a key (its decoded surroundings, `context` pixels square, band-normalised, projected
on their first `dims` principal components) and its residual (real - decoded, physical units).
A decoded image's block takes the residual of the bank block whose key is nearest, as
example-based super-resolution does, looked up among the bank blocks whose real label's majority
class is the class the image's mask draws there: a road block takes road detail, not the field
texture its surroundings may look like (docs/measurements.md, "Matched within the class the mask
draws"). Among those, the blocks whose real labels differ from the mask's at the fewest pixels
come first, so a field's edge takes a residual with an edge where the mask has one
(docs/measurements.md, "Matched to the mask's pattern"). Built once (`specdm fit-detail`), saved
in the run.

A change-detection pair is one image of both phases' bands to the bank (t1's, then t2's): a
block's key is both phases' surroundings and its residual both phases', looked up within the
class the change mask draws, so the two phases of a place take the detail of one real place
(a lookup per phase pulled unchanged pixels' phases apart: docs/measurements.md, "On cd pairs,
retrieved detail looked up once for both phases" and "On cd pairs, pattern first").
"""

from __future__ import annotations

import json
import math
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
# What one pixel whose label differs from the mask's costs, in squared key distance: enough that
# the fewest differing pixels come first (measured: 256 and past it pick alike, 64 less so).
_PATTERN_SCALE = math.sqrt(1024.0)  # on one-hot labels: squared, the weight


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
    labels: torch.Tensor  # (N, block * block) each block's real labels, IGNORE_INDEX unlabelled

    def features(self, decoded: torch.Tensor) -> torch.Tensor:
        """(C, H, W) physical -> (blocks, dims) projected surroundings of every block."""
        return (surroundings(decoded, self.mean, self.std, self.lookup) - self.centre) @ self.basis

    def __post_init__(self) -> None:
        # Blocks sorted by class (stably, so a bank's order is its own), so that each class's
        # blocks are one slice of the keys: a class-matched lookup scans only that slice.
        order = torch.argsort(self.classes, stable=True)
        self.keys, self.residuals = self.keys[order], self.residuals[:, order]
        self.classes, self.labels = self.classes[order], self.labels[order]
        self.key_norms = self.keys.pow(2).sum(dim=1)
        # Keys with each block's labels one-hot, weighted: |q - k|^2 then counts the pixels
        # whose labels differ (twice, times the weight) on top of the surroundings' distance.
        labelled = self.labels[self.labels != IGNORE_INDEX]
        self.label_count = int(labelled.max()) + 1 if len(labelled) else 1
        self.pattern_keys = torch.cat([self.keys, self._one_hot(self.labels)], dim=1)
        self.pattern_norms = self.pattern_keys.pow(2).sum(dim=1)
        values, counts = torch.unique_consecutive(self.classes, return_counts=True)
        ends = counts.cumsum(0).tolist()
        self.pools = {int(v): slice(e - n, e) for v, n, e in zip(values, counts, ends, strict=True)}

    def _one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(blocks, classes * block^2) weighted one-hot labels; zeros where unlabelled."""
        known = (labels >= 0) & (labels < self.label_count)
        onehot = F.one_hot(labels.where(known, self.label_count), self.label_count + 1)
        return onehot[..., :-1].flatten(1).float() * _PATTERN_SCALE

    def nearest(self, decoded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(blocks,) the bank block whose key is nearest each block's; with the (H, W) `mask`,
        the nearest of the class the mask draws there (of any where the bank has none of it)
        among those whose labels differ from the mask's at the fewest pixels."""
        query = self.features(decoded)
        everything = slice(0, len(self.keys))
        if mask is None:
            return self._nearest_in(query, everything, self.keys, self.key_norms)
        wanted = block_classes(mask, self.lookup.block)
        query = torch.cat([query, self._one_hot(label_patterns(mask, self.lookup.block))], dim=1)
        chosen = torch.empty(len(query), dtype=torch.long)
        for value in torch.unique(wanted).tolist():
            where, pool = wanted == value, self.pools.get(value, everything)
            chosen[where] = self._nearest_in(query[where], pool, self.pattern_keys,
                                             self.pattern_norms)  # fmt: skip
        return chosen

    @staticmethod
    def _nearest_in(
        query: torch.Tensor, pool: slice, keys: torch.Tensor, norms: torch.Tensor
    ) -> torch.Tensor:
        """(queries,) the nearest of `keys` (squared norms `norms`) among the bank blocks
        `pool`, scored a chunk at a time."""
        best = torch.full((len(query),), torch.inf)
        chosen = torch.zeros(len(query), dtype=torch.long)
        for start in range(pool.start, pool.stop, _KEY_CHUNK):
            part = slice(start, min(start + _KEY_CHUNK, pool.stop))
            # |q - k|^2 less |q|^2, which is the same for every k: one matrix product.
            scores = torch.addmm(norms[part], query, keys[part].T, alpha=-2)
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
            chosen = self.nearest(decoded, mask)
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
        """The bank's keys, residuals, classes and labels on disk: the file less its header and its
        float32 statistics and basis (0.1 MB at the defaults)."""
        return 2 * (self.keys.numel() + self.residuals.numel() + self.classes.numel()) + (
            self.labels.numel()
        )

    def save(self, path: Path) -> None:
        tensors = {"mean": self.mean, "std": self.std, "centre": self.centre,
                   "basis": self.basis, "keys": self.keys.half(),
                   "residuals": self.residuals.half(), "classes": self.classes.short(),
                   "labels": self.labels.to(torch.uint8)}  # fmt: skip
        save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"lookup": json.dumps(asdict(self.lookup))})  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Bank:
        """The bank saved at `path` (OSError/SafetensorError/KeyError/ValueError if damaged)."""
        lookup = check_bank_file(path)
        tensors = load_file(path)
        return cls(lookup, tensors["mean"], tensors["std"], tensors["centre"], tensors["basis"],
                   tensors["keys"].float(), tensors["residuals"].float(),
                   tensors["classes"].long(), tensors["labels"].long())  # fmt: skip


def add_detail(bank: Bank, phases: list[torch.Tensor], masks: torch.Tensor) -> None:
    """Add in place to each scene of the (B, C, H, W) `phases` (an ss image; a cd pair's t1 and
    t2) the detail looked up on its phases as one image of their bands stacked, within the
    classes its (H, W) mask of `masks` (B, H, W) draws."""
    detail = bank.detail_of_batch(torch.cat(phases, dim=1), masks)
    shares = torch.split(detail, [phase.shape[1] for phase in phases], dim=1)
    for phase, share in zip(phases, shares, strict=True):
        phase += share


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
        if "labels" not in handle.keys():  # noqa: SIM118
            raise ValueError("built before pattern-matched lookups: it has no block labels")
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


def label_patterns(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(blocks, block^2) the labels of each `block` x `block` block of the (H, W) `mask`."""
    blocks = F.unfold(mask[None, None].float(), block, stride=block)[0].T
    return blocks.long()


def build_bank(
    scenes: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    std: torch.Tensor,
    lookup: Lookup,
) -> Bank:
    """The bank of (decoded, real, label) scenes, images (C, H, W) in physical units, labels
    (H, W); mean and std are the run's band statistics, shaped (C, 1, 1)."""
    features, residuals, classes, labels = [], [], [], []
    for decoded, truth, label in scenes:
        features.append(surroundings(decoded, mean, std, lookup))
        residual = (truth - decoded)[None]
        residuals.append(F.unfold(residual, lookup.block, stride=lookup.block)[0])
        classes.append(block_classes(label, lookup.block))
        labels.append(label_patterns(label, lookup.block))
    stacked = torch.cat(features)
    centre = stacked.mean(dim=0)
    order = torch.randperm(len(stacked), generator=torch.Generator().manual_seed(0))
    _, _, vectors = torch.linalg.svd(stacked[order[:_PCA_ROWS]] - centre, full_matrices=False)
    basis = vectors[: lookup.dims].T.contiguous()
    keys = (stacked - centre) @ basis
    # Keys and residuals are saved as float16 (half the file: docs/measurements.md, "A bank in
    # float16"), so they are rounded to it here: the bank built is the bank read back.
    return Bank(lookup, mean, std, centre, basis, _float16_values(keys),
                _float16_values(torch.cat(residuals, dim=1)), torch.cat(classes),
                torch.cat(labels))  # fmt: skip
