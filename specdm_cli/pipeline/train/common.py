"""What every training stage shares: devices, precision, deterministic batches, augmentation."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from specdm_cli.config import Devices, Precision
from specdm_cli.errors import ModelError, UsageError
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Task
from specdm_cli.models.losses import denormalize
from specdm_cli.stores import StoreReader

if TYPE_CHECKING:  # diffusers is imported only where a VAE is built
    from specdm_cli.models.vae import SpecDMVAE


def check_batch_divides(batch_size: int, devices: Devices) -> None:
    """Data-parallel training splits every batch evenly over the ranks."""
    if batch_size % devices.ranks:
        raise UsageError(
            f"--batch-size must be a multiple of the {devices.ranks} ranks",
            hint=f"e.g. --batch-size {devices.ranks * 8}",
        )


def step_seed(seed: int, step: int, stream: str) -> int:
    """A 63-bit seed from (seed, step, stream): every random draw of a step is a function of it."""
    digest = hashlib.blake2b(f"{seed}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def d4(array: np.ndarray, rotations: int, flip: bool) -> np.ndarray:
    """One of the 8 symmetries of the square, on the last two axes."""
    out = np.rot90(array, rotations, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if flip else out)


def load_batch(
    reader: StoreReader,
    indices: np.ndarray,
    rng: np.random.Generator | None,
    pool: Executor | None = None,
) -> dict[str, np.ndarray]:
    """Stack samples `indices` (read on `pool` if given); with `rng`, each gets a random D4
    symmetry (images and label alike)."""
    read = pool.map if pool is not None else map
    samples = list(read(reader.read, (int(i) for i in indices)))
    if rng is not None:
        moves = [(int(rng.integers(4)), bool(rng.integers(2))) for _ in samples]
        samples = [
            {k: d4(v, *move) for k, v in s.items()} for s, move in zip(samples, moves, strict=True)
        ]
    return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


def to_tensors(
    batch: dict[str, np.ndarray],
    task: Task,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Band-normalised float images and int64 labels on `device`, and the valid-pixel mask."""
    label = torch.from_numpy(batch[LABEL_ARRAY[task]].astype(np.int64)).to(device)
    tensors = {LABEL_ARRAY[task]: label}
    for name in IMAGE_ARRAYS[task]:
        image = torch.from_numpy(batch[name].astype(np.float32)).to(device)
        tensors[name] = (image - mean[:, None, None]) / std[:, None, None]
    return tensors, label != IGNORE_INDEX


def round_trip_batches(
    vae: SpecDMVAE,
    real: StoreReader,
    indices: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    batch_size: int,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """The real pairs `indices` a batch at a time, encoded (posterior means) and decoded by the
    VAE: each batch's indices, its arrays as stored, and the decoded arrays (images in physical
    units, the label as logits) on the VAE's device. `mean`, `std`: (C,) on that device."""
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        arrays = load_batch(real, chunk, None)
        yield chunk, arrays, round_trip_arrays(vae, arrays, real.manifest.task, mean, std)


def round_trip_arrays(
    vae: SpecDMVAE, arrays: dict[str, np.ndarray], task: Task, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Stacked arrays as stored, encoded (posterior means) and decoded by the VAE: images in
    physical units, the label as logits, on the VAE's device (`mean`, `std`: (C,) there)."""
    batch, _valid = to_tensors(arrays, task, mean, std, mean.device)
    with torch.no_grad():
        decoded = vae.decode_joint(vae.encode_latent(batch))
    for name in IMAGE_ARRAYS[task]:
        decoded[name] = denormalize(decoded[name].float(), mean, std)
    return decoded


def image_pixels(labelled: torch.Tensor, unlabelled_class: bool) -> torch.Tensor:
    """The pixels the image loss and RMSE score. A label of 255 marks image nodata (padding,
    masked pixels) and missing labels alike; with sparse labels (`--unlabelled-class`) it marks
    the latter, whose images are real: every pixel counts then."""
    return torch.ones_like(labelled) if unlabelled_class else labelled


def validation_indices(reader: StoreReader, limit: int, warn: Callable[[str], None]) -> np.ndarray:
    """Up to `limit` samples of `val`, else of `test` (with a warning), else none."""
    for split in ("val", "test"):
        indices = reader.indices(split)
        if len(indices):
            if split == "test":
                warn("warning: the store has no val split; validating on test")
            return indices[:limit]
    warn("warning: the store has no val or test split; no validation")
    return np.array([], dtype=np.int64)


class LossScaler:
    """fp16 on CUDA scales the loss so small gradients do not underflow in half precision
    (torch's GradScaler); everywhere else (fp32, bf16, the CPU) a plain backward and step."""

    FILE = "grad_scaler.json"

    def __init__(self, device: torch.device, precision: Precision):
        enabled = device.type == "cuda" and precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        self.scaler.step(optimizer)
        self.scaler.update()

    def save(self, folder: Path) -> None:
        if self.scaler.is_enabled():
            (folder / self.FILE).write_text(json.dumps(self.scaler.state_dict()), encoding="utf-8")

    def load(self, folder: Path) -> None:
        saved = folder / self.FILE
        if not (self.scaler.is_enabled() and saved.is_file()):
            return
        try:
            self.scaler.load_state_dict(json.loads(saved.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ModelError(
                "the checkpoint's loss-scaler state is damaged", saved, "resume from another run"
            ) from None


def check_finite_loss(loss: float, step: int, run: Path) -> None:
    """A NaN or infinite loss stops training (exit 4) before it reaches a checkpoint: what was
    saved last is still the last good state."""
    if not math.isfinite(loss):
        raise ModelError(
            f"training diverged: the loss is {loss} at step {step + 1}",
            run,
            "check the store's statistics, or train again with a lower --lr and --overwrite",
        )
