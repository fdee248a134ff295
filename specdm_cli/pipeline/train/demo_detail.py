"""The ss demo model's detail bank, built on first use and kept in the user cache.

The bank `fit-detail` builds by default for 64 px scenes (300 scenes, 76,800 blocks) is 32 MiB,
four times the wheel's room for both demo models (issue 6: within 8 MB), so the package ships
the recipe instead of the bank: the train scenes of the store the bank was measured on (`specdm
prepare demo --task ss --n 5120 --size 64 --seed 11`; docs/measurements.md, "Matched to the
mask's pattern"), made again in memory by the demo generator (sample i is a function of (seed,
i) alone) and round-tripped through the shipped VAE, as `fit-detail` builds a bank. The result
is a copy of the shipped run with a `detail` stage, under `<cache>/demo-detail/<model digest>/`,
moved into place whole (a concurrent build loses the race and uses the winner's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import torch

from specdm_cli.config import DETAIL_BANK_BLOCKS, DetailConfig, Progress
from specdm_cli.errors import ModelError, UsageError, reason_of, resource_error_from
from specdm_cli.fs.atomic import remove_tree
from specdm_cli.models.detail import Lookup
from specdm_cli.pipeline.devices import torch_threads
from specdm_cli.pipeline.runs.choose import ChosenModel, model_sha256
from specdm_cli.pipeline.runs.detail_io import require_bank
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.signals import StopFlag, stoppable
from specdm_cli.pipeline.train.common import round_trip_arrays
from specdm_cli.pipeline.train.fit_detail import (
    LOOKUP,
    band_statistics,
    commit_bank,
    spread_evenly,
)
from specdm_cli.sources.demo.reader import make_sample, split_of


# The store the demo bank's scenes come from, as `prepare demo` makes it (its default val and
# test fractions).
@dataclass(frozen=True)
class DemoStore:
    n: int = 5120
    size: int = 64
    seed: int = 11
    val_fraction: float = 0.1
    test_fraction: float = 0.1

    @property
    def command(self) -> str:
        return f"prepare demo --task ss --n {self.n} --size {self.size} --seed {self.seed}"


BANK_STORE = DemoStore()
# fit-detail's default bank for 64 px scenes: the bank the gate measured (300 scenes).
BANK_SCENES = DETAIL_BANK_BLOCKS // (BANK_STORE.size // Lookup().block) ** 2
_CHUNK = 32  # scenes round-tripped between progress reports and Ctrl-C checks


def cache_dir() -> Path:
    """`<SPECDM_HOME>/cache/demo-detail` if SPECDM_HOME is set, else the user cache dir's."""
    home = os.environ.get("SPECDM_HOME")
    root = Path(home) / "cache" if home else Path(platformdirs.user_cache_dir("specdm"))
    return root / "demo-detail"


def demo_with_bank(
    demo: ChosenModel,
    stop: StopFlag,
    progress: Progress | None = None,
    notice: Callable[[str], None] = lambda line: None,
) -> ChosenModel:
    """The shipped ss demo model with its detail bank: the cached copy, built first if needed;
    any other model as it is."""
    if demo.kind != "demo" or demo.manifest.task != "ss":
        return demo
    cached = cache_dir() / demo.sha256[:16]
    manifest = _usable(cached)
    if manifest is None:
        notice(f"detail: building the demo model's detail bank once ({BANK_SCENES} demo scenes"
               f" through its VAE), cached in {cached}")  # fmt: skip
        _build(demo, cached, stop, progress)
        manifest = load_run(cached)
    return ChosenModel(cached, demo.kind, manifest, model_sha256(manifest), demo.why)


def _usable(cached: Path) -> RunManifest | None:
    """The cached copy's run.json where the copy is whole (its weights and bank match it)."""
    if not cached.is_dir():
        return None
    try:
        manifest = load_run(cached)
        require_bank(cached, manifest)
    except (ModelError, UsageError):
        remove_tree(cached)  # damaged or of an earlier kind: built again
        return None
    return manifest


def _build(demo: ChosenModel, cached: Path, stop: StopFlag, progress: Progress | None) -> None:
    """Copy the shipped run aside, commit its bank there, then move the copy into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    temp = cached.parent / f".{cached.name}.{os.getpid()}.partial"
    remove_tree(temp)
    try:
        shutil.copytree(demo.path, temp)
        _commit_bank(temp, demo, stop, progress)
        temp.rename(cached)
    except OSError as exc:
        if _usable(cached) is None:  # not another process's finished copy: a real error
            raise resource_error_from(exc, cached) or ModelError(
                f"cannot build the demo model's detail bank ({reason_of(exc)})", cached,
                "make the cache folder writable (or SPECDM_HOME another), or pass --no-detail",
            ) from None  # fmt: skip
    finally:
        remove_tree(temp)


def _commit_bank(run: Path, demo: ChosenModel, stop: StopFlag, progress: Progress | None) -> None:
    scenes = bank_scenes()
    config = DetailConfig(scenes=BANK_SCENES)
    identity = {**config.model_dump(mode="json"), "scenes": len(scenes), "lookup": LOOKUP,
                "store": BANK_STORE.command,
                "vae_weights": dict(demo.manifest.stages["vae"].weights)}  # fmt: skip
    trips = _round_trips(demo, scenes, stop, progress)
    # Built (the round trips run as the bank consumes them) and committed on one thread:
    # decoded scenes, so the bank's bytes, differ with torch's thread count, and a store's plan
    # records the bank's digest: whatever --threads, one machine builds one bank.
    with torch_threads(1):
        commit_bank(run, config, trips, band_statistics(demo.manifest), identity, len(scenes),
                    BANK_STORE.command)  # fmt: skip


def bank_scenes() -> np.ndarray:
    """The demo indices of the bank: the store's train scenes, spread evenly over the split."""
    store = BANK_STORE
    splits = [split_of(store.seed, i, store.val_fraction, store.test_fraction)
              for i in range(store.n)]  # fmt: skip
    return spread_evenly(np.flatnonzero(np.array(splits) == "train"), BANK_SCENES)


def _round_trips(
    demo: ChosenModel, scenes: np.ndarray, stop: StopFlag, progress: Progress | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(decoded, real, label) of every bank scene, as `fit_detail.round_trips` gives them."""
    device = torch.device("cpu")
    vae = load_vae(demo.path, demo.manifest, device)
    mean, std = (t.flatten() for t in band_statistics(demo.manifest))
    report = stoppable(progress, stop)
    for start in range(0, len(scenes), _CHUNK):
        chunk = scenes[start : start + _CHUNK]
        samples = [make_sample(BANK_STORE.seed, int(i), "ss", BANK_STORE.size, "s2") for i in chunk]
        arrays = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
        images = round_trip_arrays(vae, arrays, "ss", mean, std)["image"]
        truth = torch.from_numpy(arrays["image"].astype(np.float32))
        yield from zip(images, truth, torch.from_numpy(arrays["mask"]), strict=True)
        report("detail bank", min(start + _CHUNK, len(scenes)), len(scenes))
