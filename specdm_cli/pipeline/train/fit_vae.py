"""The `fit-vae` stage: train the two-stream VAE (paper Sec. 3.1, 3.4) into a run directory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdm_cli.config import Devices, Progress, VAETrainConfig
from specdm_cli.errors import InputDataError, Interrupted, ModelError, UsageError
from specdm_cli.fs.lock import ReadLock
from specdm_cli.fs.paths import refuse_overlap
from specdm_cli.fs.space import require_memory
from specdm_cli.manifest import Manifest, Task, array_names
from specdm_cli.pipeline.devices import torch_devices
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.checkpoints import load_optimizer
from specdm_cli.pipeline.runs.provenance import provenance
from specdm_cli.pipeline.runs.registry import default_run_dir, user_dir
from specdm_cli.pipeline.runs.run_manifest import RUN_FILE, load_run
from specdm_cli.pipeline.runs.vae_io import load_branches
from specdm_cli.pipeline.signals import StopFlag, stoppable
from specdm_cli.pipeline.train.common import check_batch_divides, validation_indices
from specdm_cli.pipeline.train.driver import (
    Schedule,
    check_resume_steps,
    estimating,
    launch,
    train_loop,
)
from specdm_cli.pipeline.train.vae_trainer import (
    VAETrainer,
    model_config,
    require_trainable_samples,
    training_indices,
)
from specdm_cli.stores import StoreReader, open_store, store_sha256


@dataclass(frozen=True)
class FitVAERequest:
    """A validated `specdm fit-vae` invocation."""

    store: Path
    run: Path | None
    config: VAETrainConfig
    resume: bool = False
    overwrite: bool = False
    devices: Devices = field(default_factory=Devices)


@dataclass
class FitVAESummary:
    """What `fit-vae` did, for the terminal and `--json`."""

    run: str
    state: str
    step: int
    steps: int
    seconds: float
    steps_per_second: float
    losses: dict[str, float] = field(default_factory=dict)
    validation: dict[str, Any] | None = None


# Float32 values per pixel a training sample keeps for the backward pass: both branches'
# full-resolution activations (our estimate, generous; it only has to catch sizes that cannot
# work, like --batch-size 10**9, which ended in std::bad_alloc, exit 1).
_TRAINING_VALUES_PER_PIXEL = 1024


def _require_batch_memory(batch_size: int, manifest: Manifest) -> None:
    images = len(array_names(manifest.task)) - 1
    values = images * len(manifest.bands) + len(manifest.classes) + _TRAINING_VALUES_PER_PIXEL
    require_memory(
        float(batch_size) * manifest.height * manifest.width * values * 4,
        f"a training batch of {batch_size}",
        "use a smaller --batch-size (e.g. 16)",
    )


@dataclass(frozen=True)
class _Job:
    """What every rank needs to train (picklable: ranks may be separate processes)."""

    run: Path
    store: Path
    config: VAETrainConfig
    checkpoint: str | None
    start: int
    val: np.ndarray


def fit_vae(
    request: FitVAERequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda line: None,
    notice: Callable[[str], None] = lambda line: None,
) -> FitVAESummary:
    """Train (or resume) the VAE of a run; checkpoints are atomic and resume is bit-exact.

    `warn` takes warnings (what a pipeline may act on), `notice` progress lines such as the
    time estimate. The store is claimed for reading throughout: `--overwrite` elsewhere refuses
    to replace it.
    """
    with ReadLock(request.store):
        return _fit_vae(request, stop, progress, (warn, notice))


def _fit_vae(
    request: FitVAERequest,
    stop: StopFlag,
    progress: Progress | None,
    told: tuple[Callable[[str], None], Callable[[str], None]],
) -> FitVAESummary:
    started = time.monotonic()
    reader = open_store(request.store)
    model_config(request.config, reader.manifest)  # a bad shape is told before the run dir exists
    require_trainable_samples(reader, request.config.downsample)
    training_indices(reader, request.config)  # and so is a split with no samples
    _warn_of_an_idle_limit(reader, request.config, told[0])
    _require_batch_memory(request.config.batch_size, reader.manifest)
    check_batch_divides(request.config.batch_size, request.devices)
    if request.config.adversarial_weight > 0 and request.devices.ranks > 1:
        raise UsageError(
            "--adversarial-weight trains on one device only", hint="drop --gpus or the term"
        )
    devices = torch_devices(request.devices)
    run = request.run or _default_run(request.store, request.resume)
    refuse_overlap(run, {"STORE": request.store})
    created = not run.exists()
    state = runs.prepare_run_dir(run, request.resume, request.overwrite)
    with runs.RunLock(run) as lock:
        if state == "overwrite":
            runs.set_aside(run, lock.path)
        try:
            summary, start, task = _train_in(
                run, state, reader, request, devices, stop, progress, told
            )
        except Exception as error:
            discarded = False
            if state == "overwrite":  # the old run back, unless the new one checkpointed
                runs.settle_old_run(run)
            elif state == "fresh":  # nothing trained: the same command can simply be run again
                discarded = runs.discard_untrained(run, "vae", created)  # under our lock
            if isinstance(error, Interrupted):
                raise _told_how_to_go_on(error, run, discarded) from None
            raise
    if summary.state == "already complete":
        # A registry that could not be written when the run finished left it unregistered;
        # the same command again mends that.
        runs.ensure_registered(run, task, "vae", can_sample=False)
        return summary
    runs.register(run, task, "vae", can_sample=False)
    summary.seconds = round(time.monotonic() - started, 3)
    summary.state = "resumed" if start else "trained"
    return summary


def _warn_of_an_idle_limit(
    reader: StoreReader, config: VAETrainConfig, warn: Callable[[str], None]
) -> None:
    """--limit at or above the split's size cuts nothing: the limited-data protocol asked for
    is then not the one run."""
    size = len(reader.indices(config.split))
    if config.limit is not None and config.limit > size:
        warn(
            f"warning: --limit {config.limit} is above the {size} {config.split!r} samples of "
            f"the store: fit-vae trains on all {size}"
        )


def _note_a_longer_segmenter(
    config: VAETrainConfig, checkpoint: str | None, notice: Callable[[str], None]
) -> None:
    """A short run (`--steps 2` to try the command) first trains the semantic term's segmenter
    for its own steps: a minute on a CPU that the run's --steps do not explain."""
    if checkpoint is None and config.semantic_weight > 0 and config.steps < config.semantic_steps:
        notice(
            f"note: the semantic term's segmenter trains {config.semantic_steps} steps before "
            f"the VAE's {config.steps} (--semantic-weight 0 leaves the term out)"
        )


def _default_run(store: Path, resume: bool) -> Path:
    """A new run folder; with --resume, the newest run of this store under the runs folder (an
    interrupted `fit-vae STORE` without --run is continued by the same command with --resume)."""
    if not resume:
        return default_run_dir(store)
    digest = store_sha256(store)
    runs_dir = user_dir() / "runs"
    ours = [
        path.parent for path in runs_dir.glob(f"*/{RUN_FILE}") if _run_of(path.parent) == digest
    ]
    if not ours:
        raise InputDataError(
            "--resume without --run: no run of this store in the runs folder",
            store,
            f"pass --run RUN (a run folder under {runs_dir}, or where you put it)",
        )
    return max(ours, key=lambda run: (run / RUN_FILE).stat().st_mtime)


def _run_of(run: Path) -> str | None:
    """The store digest a run was trained on, None for a run.json that cannot be read."""
    try:
        return load_run(run, verify=False).source_manifest_sha256
    except (ModelError, InputDataError):
        return None


def _told_how_to_go_on(stopped: Interrupted, run: Path, discarded: bool) -> Interrupted:
    """The interruption with what to run next: nothing to resume before the first checkpoint
    (the run was removed), else the run that --resume continues, by name."""
    if discarded:
        return Interrupted(stopped.signum, "nothing was trained yet: run the same command again")
    return Interrupted(stopped.signum, f"rerun with --resume (the run: {run})")


def _train_in(
    run: Path,
    state: runs.RunState,
    reader: StoreReader,
    request: FitVAERequest,
    devices: list[torch.device],
    stop: StopFlag,
    progress: Progress | None,
    told: tuple[Callable[[str], None], Callable[[str], None]],
) -> tuple[FitVAESummary, int, Task]:
    """Train (under the run's lock): (summary, the step it started from, the task); `told`:
    where warnings and notices go."""
    warn, notice = told
    manifest = runs.open_or_create_run(
        run, reader, state, store_sha256(request.store), provenance()
    )
    stage = manifest.stages.get("vae")
    if stage is not None:
        runs.check_resume(run, stage.config, request.config.training_identity())
        if stage.finished and stage.step >= request.config.steps:
            done = FitVAESummary(
                str(run), "already complete", stage.step, request.config.steps, 0.0, 0.0
            )
            return done, stage.step, manifest.task
    checkpoint = stage.checkpoint if stage is not None else None
    start = stage.step if stage is not None and checkpoint else 0
    if start:
        check_resume_steps(start, request.config.steps, "VAE")
    job = _Job(
        run,
        request.store,
        request.config,
        checkpoint,
        start,
        validation_indices(reader, request.config.val_samples, warn),
    )
    _note_a_longer_segmenter(request.config, checkpoint, notice)
    recipe = f"preset {request.config.preset}"
    timed = estimating(progress, notice, "fit-vae", recipe)
    summary = launch(devices, _rank_main, job, stop, timed) or _summary_from_run(job)
    return summary, start, manifest.task


def _rank_main(
    rank: int,
    world: int,
    device: torch.device,
    job: _Job,
    stop: StopFlag | None = None,
    progress: Progress | None = None,
) -> FitVAESummary:
    """One rank: build the model, load the checkpoint, wrap for data parallelism, train."""
    reader = open_store(job.store)
    trainer = VAETrainer(reader, job.config, device, rank, world, job.run, job.val)
    if job.checkpoint is not None:
        load_branches(trainer.model, job.run / job.checkpoint)
        trainer.model.to(device).train()  # from_pretrained hands back eval-mode modules
    trainer.wrap()
    if job.checkpoint is not None:
        load_optimizer(trainer.optimizer, job.run / job.checkpoint)
        trainer.scaler.load(job.run / job.checkpoint)
    stop = stop or StopFlag()
    trainer.prepare_critics(
        job.run / job.checkpoint if job.checkpoint is not None else None,
        stoppable(progress, stop) if world == 1 else progress,
    )
    config = job.config
    schedule = Schedule(config.steps, config.val_every, config.checkpoint_every, "fit-vae", "total")
    trained = train_loop(job.run, trainer, job.start, schedule, stop, progress)
    return FitVAESummary(
        str(job.run), "", config.steps, config.steps, 0.0, trained.steps_per_second,
        trained.last, trainer.validation,
    )  # fmt: skip


def _summary_from_run(job: _Job) -> FitVAESummary:
    manifest = load_run(job.run)
    step, validation = manifest.stages["vae"].step, manifest.vae_details().validation
    return FitVAESummary(str(job.run), "", step, job.config.steps, 0.0, 0.0, {}, validation)
