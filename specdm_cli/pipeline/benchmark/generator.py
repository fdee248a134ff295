"""The generator's side of a benchmark: what real data it saw, VAE reconstruction, sampling speed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdm_cli.errors import InputDataError, ModelError, SpecdmError
from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Manifest
from specdm_cli.models.detail import Bank, add_detail
from specdm_cli.pipeline.runs.choose import ChosenModel
from specdm_cli.pipeline.runs.detail_io import has_bank
from specdm_cli.pipeline.runs.run_manifest import RunManifest, class_difference, load_run
from specdm_cli.stores import StoreReader, content_sha256, open_store
from specdm_cli.stores.base import MANIFEST_NAME
from specdm_cli.stores.hints import held_out_hint

from .feature_training import ArraySource
from .features import manifest_sha256
from .quality import split_indices
from .report import GeneratorInfo, Reconstruction, StoreRef, Throughput, TileSizes


def generator_info(
    synthetic: StoreReader, real: StoreReader, real_ref: StoreRef, chosen: ChosenModel | None
) -> GeneratorInfo | None:
    """The run behind `synthetic` (--model, else the run its manifest names, if still there);
    `real_ref` carries the real store's digests, computed once for the report."""
    model = synthetic.manifest.model
    run = chosen.manifest if chosen is not None else _run_of(model.path if model else None)
    if run is None:
        if model is None:
            return None
        source = model.details.get("source_manifest_sha256")
        return GeneratorInfo(
            run_id=model.run_id, kind=model.kind, path=model.path,
            source_manifest_sha256=source,
            real_store_is_source=source == real_ref.manifest_sha256,
        )  # fmt: skip
    vae = run.stages.get("vae")
    config = vae.config if vae else {}
    seen = run.vae_details().train_samples if vae else None
    return GeneratorInfo(
        run_id=run.run_id, kind=chosen.kind if chosen else (model.kind if model else "run"),
        path=str(chosen.path) if chosen else (model.path if model else None),
        train_split=config.get("split"), train_limit=config.get("limit"),
        real_pairs_seen=int(seen) if seen is not None else None,
        source_manifest_sha256=run.source_manifest_sha256,
        real_store_is_source=run.trained_on(real_ref.manifest_sha256, real_ref.content_sha256),
        heldout_in_training=heldout_in_training(run, real),
        synthetic_made_by=other_maker(synthetic, chosen),
        tile_sizes=other_tile_size(chosen, real),
    )  # fmt: skip


def made_by(synthetic: StoreReader, chosen: ChosenModel) -> bool:
    """`chosen` is the model (weights and bank) that made the synthetic store (the digest its
    plan records, which every shard and resume of the store agreed on)."""
    return synthetic.manifest.plan.get("model_sha256") == chosen.sha256


def with_detail(synthetic: StoreReader, chosen: ChosenModel) -> bool:
    """Whether --model's figures (throughput, round trips) add its retrieved detail: as the
    synthetic store was sampled where this model made it (`--no-detail` leaves it out of the
    store's plan), else as `synthesize` samples by default, with the bank the run has."""
    if not has_bank(chosen.manifest):
        return False
    return "detail" in synthetic.manifest.plan if made_by(synthetic, chosen) else True


def other_maker(synthetic: StoreReader, chosen: ChosenModel | None) -> str | None:
    """The model the synthetic store names, where --model is another one."""
    model = synthetic.manifest.model
    if chosen is None or model is None or made_by(synthetic, chosen):
        return None
    sha = str(synthetic.manifest.plan.get("model_sha256") or "unrecorded")[:12]
    if model.run_id == chosen.manifest.run_id and "demo" not in (model.kind, chosen.kind):
        return f"an earlier state of {model.run_id} (sha256 {sha}; its weights changed since)"
    return f"{model.run_id} ({model.kind}, sha256 {sha})"


def other_tile_size(chosen: ChosenModel | None, real: StoreReader) -> TileSizes | None:
    """--model's tile size and the real store's, where they differ."""
    if chosen is None:
        return None
    model = (chosen.manifest.height, chosen.manifest.width)
    tiles = (real.manifest.height, real.manifest.width)
    return None if model == tiles else TileSizes(model=model, real=tiles)


# The prepare options under which a demo source id ("demo/000123") names the same scene.
_DEMO_SCENE_OPTIONS = ("seed", "size", "task", "band_set", "demo_variant")


def heldout_in_training(run: RunManifest, real: StoreReader) -> int | None:
    """How many of `real`'s held-out pairs (val + test) the run trained on: source ids among the
    pairs its VAE and U-Net trained on, read from its training store when that store is still
    where run.json says, unchanged, and made from the same raw data (None: not checked)."""
    trained_on = _training_store(run)
    if trained_on is None or not _same_scenes(trained_on.manifest, real.manifest):
        return None
    trained_ids, real_ids = trained_on.source_ids(), real.source_ids()
    if trained_ids is None or real_ids is None:
        return None
    vae = run.stages.get("vae")
    config = vae.config if vae is not None else {}
    trained = trained_on.indices(config.get("split"))[: config.get("limit") or None]
    seen = {trained_ids[int(i)] for i in trained}
    heldout, _ = split_indices(real, "heldout")
    return sum(real_ids[int(i)] in seen for i in heldout)


def _training_store(run: RunManifest) -> StoreReader | None:
    path = Path(run.source_store)
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        store = open_store(path)
    except SpecdmError:
        return None
    sha = manifest_sha256(store)
    # The content digest reads every sample's checksum: needed only when the manifests differ.
    content = None if sha == run.source_manifest_sha256 else content_sha256(store)
    return store if run.trained_on(sha, content) else None


def _same_scenes(a: Manifest, b: Manifest) -> bool:
    """Both stores prepared from the same raw data (demo: the same scenes), so a source id
    names the same place in both."""
    plan_a, plan_b = a.plan, b.plan
    if plan_a.get("stage") != "prepare" or plan_b.get("stage") != "prepare":
        return False
    if (plan_a.get("source"), plan_a.get("raw")) != (plan_b.get("source"), plan_b.get("raw")):
        return False
    options_a, options_b = plan_a.get("options", {}), plan_b.get("options", {})
    demo = plan_a.get("source") == "demo"
    return not demo or all(options_a.get(k) == options_b.get(k) for k in _DEMO_SCENE_OPTIONS)


def _run_of(path: str | None) -> RunManifest | None:
    if not path or not (Path(path) / "run.json").is_file():
        return None
    try:
        return load_run(Path(path), verify=False)
    except ModelError:
        return None


def check_model_fits(chosen: ChosenModel, real: StoreReader) -> None:
    """The run must be of the real store's task, band count and classes (exit 4), and its VAE
    must take the real store's tiles (exit 3)."""
    from specdm_cli.models.vae_config import VAEConfig

    run, manifest = chosen.manifest, real.manifest
    fix = "pass the --model trained on data like --real"
    if run.task != manifest.task or len(run.bands) != len(manifest.bands):
        raise ModelError(
            f"the model is for task {run.task} with {len(run.bands)} bands, the real store is "
            f"{manifest.task} with {len(manifest.bands)}",
            chosen.path,
            fix,
        )
    differ = class_difference(run.classes, manifest.classes, "the real store")
    if differ is not None:
        raise ModelError(
            f"{differ}: its masks would be scored against other classes", chosen.path, fix
        )
    step = VAEConfig.model_validate(run.vae_details().model).downsample
    if manifest.height % step or manifest.width % step:
        raise InputDataError(
            f"the real store's tiles are {manifest.height}x{manifest.width} px, not a multiple of "
            f"the {step} px the model's VAE downsamples by",
            real.root,
            f"prepare the real store at a --patch-size that is a multiple of {step}",
        )


def reconstruction(
    chosen: ChosenModel, real: StoreReader, device: torch.device, batch_size: int = 16
) -> Reconstruction:
    """Table 4: reconstruct the real val split (else test) through the run's VAE."""
    from specdm_cli.pipeline.runs.vae_io import load_vae
    from specdm_cli.pipeline.train.vae_validation import validate

    split = "val" if real.indices("val").size else "test"
    indices = real.indices(split)
    if indices.size == 0:
        raise InputDataError(
            "the real store has no val or test split", real.root, held_out_hint(real.manifest)
        )
    norm = chosen.manifest.normalization
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device)
    std = torch.tensor(norm.std, dtype=torch.float32, device=device)
    model = load_vae(chosen.path, chosen.manifest, device)
    result = validate(model, real, indices, chosen.manifest.task, mean, std, batch_size)
    return Reconstruction(split=split, count=int(indices.size), **result)


@torch.no_grad()
def round_trip(
    chosen: ChosenModel,
    real: StoreReader,
    indices: np.ndarray,
    device: torch.device,
    batch_size: int = 16,
    bank: Bank | None = None,
) -> ArraySource:
    """Real pairs `indices` encoded and decoded by the run's VAE (posterior means, as Table 4).

    Images come back in physical units (the store's, so downstream normalises them like real
    ones), with `bank`'s retrieved detail added as `synthesize --detail` adds it; labels are the
    decoded argmax, with the real ignore pixels kept ignored (nodata is not the VAE's to fill
    in). What a downstream model learns from these is the most any generator decoding through
    this VAE (and bank) can give it.
    """
    from specdm_cli.pipeline.runs.vae_io import load_vae
    from specdm_cli.pipeline.train.common import round_trip_batches

    task, norm = real.manifest.task, chosen.manifest.normalization
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=device)
    std = torch.tensor(norm.std, dtype=torch.float32, device=device)
    model = load_vae(chosen.path, chosen.manifest, device)
    samples: dict[int, dict[str, np.ndarray]] = {}
    for chunk, arrays, decoded in round_trip_batches(model, real, indices, mean, std, batch_size):
        label = model.labels(decoded[LABEL_ARRAY[task]]).cpu().numpy().astype(np.uint8)
        label[arrays[LABEL_ARRAY[task]] == IGNORE_INDEX] = IGNORE_INDEX
        physical = {name: decoded[name].cpu() for name in IMAGE_ARRAYS[task]}
        if bank is not None:  # a cd pair's phases take one lookup (models/detail.py)
            add_detail(bank, list(physical.values()), torch.from_numpy(label))
        for k, index in enumerate(chunk):
            sample = {name: values[k].numpy() for name, values in physical.items()}
            samples[int(index)] = sample | {LABEL_ARRAY[task]: label[k]}
    return ArraySource(real.manifest, samples)


def throughput(
    chosen: ChosenModel, synthetic: StoreReader, device: torch.device, batches: int = 2
) -> Throughput:
    """Pairs per second of sampling + decoding (no I/O): `batches` batches after a warm-up one.

    The synthetic store's own plan (sampler, steps, B, precision, detail) is timed when this
    model made it, so the figure is the speed that store was made at.
    """
    plan = synthetic.manifest.plan
    same = made_by(synthetic, chosen)
    defaults = synthesize_defaults(chosen, device)  # its keys are those timed
    settings = {key: plan[key] if same else value for key, value in defaults.items()}
    size, steps = int(settings["batch_size"]), int(settings["steps"])
    detail = with_detail(synthetic, chosen)
    draw = _batch_sampler(
        chosen, device, str(settings["sampler"]), str(settings["precision"]), size, detail
    )
    draw(range(0, size), steps)
    start = time.perf_counter()
    for k in range(1, batches + 1):
        draw(range(k * size, (k + 1) * size), steps)
    seconds = time.perf_counter() - start
    return Throughput(
        pairs_per_second=round(batches * size / max(seconds, 1e-9), 3), pairs=batches * size,
        batch_size=size, sampler=str(settings["sampler"]), steps=steps,
        precision=str(settings["precision"]), device=str(device), detail=detail,
    )  # fmt: skip


def synthesize_defaults(chosen: ChosenModel, device: torch.device) -> dict[str, Any]:
    """What `specdm synthesize --model MODEL` samples with on `device` given no sampling
    options: timed for a store this model did not make, which has no plan of its own to copy."""
    from specdm_cli.pipeline.synthesize.sampler import SamplingPlan, resolve_sampler
    from specdm_cli.pipeline.synthesize.synthesize import AUTO_BATCH, sampler_steps

    sampler = resolve_sampler("auto", None, chosen)
    return {
        "sampler": sampler,
        "steps": sampler_steps(sampler, None, chosen),
        "batch_size": AUTO_BATCH[device.type],
        "precision": SamplingPlan.precision,
    }


def _batch_sampler(
    chosen: ChosenModel,
    device: torch.device,
    sampler: Any,
    precision: Any,
    batch_size: int,
    detail: bool,
) -> Callable[[range, int], None]:
    """A function drawing and decoding samples `indices` exactly as `synthesize` does."""
    from specdm_cli.pipeline.synthesize.sampler import Sampler, SamplingPlan

    plan = SamplingPlan(sampler, 0, batch_size, precision, detail=detail)
    model = Sampler(chosen, plan, device)

    def draw(indices: range, steps: int) -> None:
        model.batch(indices.start, len(indices), steps)  # arrays come back on the host

    return draw
