"""The `fit-detail` stage: a bank of detail retrieved by example, saved in the run beside its
VAE, that `synthesize --detail` adds to decoded images (models/detail.py).

The bank's scenes are real ones from the store's train split, spread evenly over it, each
encoded and decoded by the run's VAE (a cd pair's two phases as one image of both phases' bands);
built in one pass (no steps to resume), it replaces a bank of other options only with
`--overwrite`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from specdm_cli.config import DETAIL_BANK_BLOCKS, DetailConfig, Devices, Progress
from specdm_cli.errors import InputDataError
from specdm_cli.fs.lock import ReadLock
from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.models.detail import Lookup, build_bank
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.choose import ChosenModel, choose_model
from specdm_cli.pipeline.runs.detail_io import BANK_FILE, STAGE
from specdm_cli.pipeline.runs.run_manifest import RunManifest, check_store_fits, load_run
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.signals import StopFlag, stoppable
from specdm_cli.pipeline.train.common import round_trip_batches
from specdm_cli.stores import StoreReader, content_sha256, open_store

_ROUND_TRIP_CHUNK = 32  # scenes decoded between progress reports and Ctrl-C checks
# How blocks are looked up: in the identity, so a bank of an earlier kind (no block labels)
# is not "already complete" but rebuilt with --overwrite.
LOOKUP = "within the mask's class, its pattern first"


@dataclass(frozen=True)
class FitDetailRequest:
    run: Path
    store: Path
    config: DetailConfig
    overwrite: bool = False
    devices: Devices = field(default_factory=Devices)


@dataclass
class FitDetailSummary:
    run: str
    state: str
    scenes: int
    blocks: int
    bank_bytes: int
    seconds: float


def fit_detail(
    request: FitDetailRequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda line: None,
) -> FitDetailSummary:
    """Build the run's detail bank from the store's train scenes (or find it built)."""
    started = time.monotonic()
    device = torch_devices(request.devices.one("fit-detail"))[0]
    load_run(request.run, verify=False)  # a clear error before the lock creates anything
    with ReadLock(request.store), runs.RunLock(request.run):
        real = open_store(request.store)
        chosen = _vae_of(request.run, real)
        scenes = bank_scenes(real, request.config, chosen.manifest)
        identity = _identity(request.config, real, chosen.manifest, scenes)
        stage = chosen.manifest.stages.get(STAGE)
        if stage is not None and stage.finished and stage.config == identity:
            return _summary(request.run, "already complete", stage.details, started)
        if stage is not None and not request.overwrite:
            raise InputDataError(
                "the run already has a detail bank, built from other scenes or options",
                request.run,
                "pass --overwrite to replace it, or the options it was built with",
            )
        trips = round_trips(chosen, real, scenes, device, stop, progress)
        details = commit_bank(request.run, request.config, trips, bank_statistics(chosen.manifest),
                              identity, len(scenes), str(request.store))  # fmt: skip
    return _summary(request.run, "built", details, started)


def commit_bank(
    run: Path,
    config: DetailConfig,
    trips: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    statistics: tuple[torch.Tensor, torch.Tensor],
    identity: dict[str, object],
    scenes: int,
    store: str,
) -> dict[str, object]:
    """Build a bank from the round trips of `scenes` scenes, (decoded, real, label) each, and
    commit it as the run's detail stage; its details (`store`: where the scenes came from)."""
    bank = build_bank(trips, *statistics, Lookup(config.block, config.context, config.dims))
    details: dict[str, object] = {"scenes": scenes, "blocks": len(bank.keys),
               "bank_bytes": bank.stored_bytes, "store": store}  # fmt: skip
    runs.commit_checkpoint(run, STAGE, 1, lambda folder: bank.save(folder / BANK_FILE),
                           identity, True, details)  # fmt: skip
    return details


def _vae_of(run: Path, real: StoreReader) -> ChosenModel:
    """The run (its VAE finished), for a store of its task whose labels fit."""
    chosen = choose_model(str(run), real.manifest.task, vae_only=True)
    check_store_fits(real, chosen.manifest, "fit-detail")
    if [b.name for b in real.manifest.bands] != [b.name for b in chosen.manifest.bands]:
        raise InputDataError(
            "the store's bands are not the run's", real.root, "pass the store the run trained on"
        )
    return chosen


def bank_scenes(real: StoreReader, config: DetailConfig, run: RunManifest) -> np.ndarray:
    """The train scenes of the bank, spread evenly over the split (neighbours look alike)."""
    train = real.indices("train")
    if len(train) == 0:
        raise InputDataError(
            "the store has no train scenes to build the bank from", real.root,
            "pass a prepared store with a train split",
        )  # fmt: skip
    per_scene = (run.height // config.block) * (run.width // config.block)
    return spread_evenly(train, config.scenes or max(1, DETAIL_BANK_BLOCKS // per_scene))


def spread_evenly(indices: np.ndarray, wanted: int) -> np.ndarray:
    """Up to `wanted` of `indices`, evenly spaced over them (first and last included)."""
    picks = np.linspace(0, len(indices) - 1, min(wanted, len(indices))).round().astype(int)
    chosen: np.ndarray = indices[np.unique(picks)]
    return chosen


def _identity(
    config: DetailConfig, real: StoreReader, run: RunManifest, scenes: np.ndarray
) -> dict[str, object]:
    """What the same command must match to find its bank built (a cd bank also says that its
    images are both phases' bands; an ss bank's identity is as it was before cd banks)."""
    phases = {"phases": list(IMAGE_ARRAYS["cd"])} if run.task == "cd" else {}
    return {**config.model_dump(mode="json"), "scenes": len(scenes), "lookup": LOOKUP, **phases,
            "store_content_sha256": content_sha256(real),
            "vae_weights": dict(run.stages["vae"].weights)}  # fmt: skip


def round_trips(
    chosen: ChosenModel,
    real: StoreReader,
    scenes: np.ndarray,
    device: torch.device,
    stop: StopFlag,
    progress: Progress | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(decoded, real, label) of every bank scene, images in physical units: each encoded
    (posterior mean) and decoded by the run's VAE; a cd pair's phases are one image of t1's
    bands then t2's, its label the change mask."""
    vae = load_vae(chosen.path, chosen.manifest, device)
    mean, std = (t.flatten().to(device) for t in band_statistics(chosen.manifest))
    task = chosen.manifest.task
    names = IMAGE_ARRAYS[task]
    done, report = 0, stoppable(progress, stop)
    for _, arrays, decoded in round_trip_batches(vae, real, scenes, mean, std, _ROUND_TRIP_CHUNK):
        images = torch.cat([decoded[name].cpu() for name in names], dim=1)
        truth = np.concatenate([arrays[name] for name in names], axis=1).astype(np.float32)
        labels = torch.from_numpy(arrays[LABEL_ARRAY[task]])
        yield from zip(images, torch.from_numpy(truth), labels, strict=True)
        done += len(labels)
        report("fit-detail", done, len(scenes))


def bank_statistics(run: RunManifest) -> tuple[torch.Tensor, torch.Tensor]:
    """The band means and stds (C', 1, 1) of the bank's images: a cd pair's, of both phases'
    bands, are the run's repeated (the VAE normalises both phases alike)."""
    mean, std = band_statistics(run)
    phases = len(IMAGE_ARRAYS[run.task])
    return mean.repeat(phases, 1, 1), std.repeat(phases, 1, 1)


def band_statistics(run: RunManifest) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(run.normalization.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(run.normalization.std, dtype=torch.float32).view(-1, 1, 1)
    return mean, std


def _summary(run: Path, state: str, details: dict[str, object], started: float) -> FitDetailSummary:
    scenes, blocks, size = (int(str(details[k])) for k in ("scenes", "blocks", "bank_bytes"))
    return FitDetailSummary(str(run), state, scenes, blocks, size,
                            round(time.monotonic() - started, 3))  # fmt: skip
