"""Run directories: create, resume or overwrite; lock; atomic checkpoints; the run registry."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from specdm_cli.config import (
    DiffusionTrainConfig,
    DistillTrainConfig,
    VAETrainConfig,
    train_option,
)
from specdm_cli.errors import (
    InputDataError,
    ModelError,
    ResourceError,
    refuse_resume_with_overwrite,
    resource_error_from,
)
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import remove_stray_temporaries, remove_tree
from specdm_cli.fs.lock import DirLock, refuse_if_locked
from specdm_cli.pipeline.runs.checkpoints import (
    is_disk_full,
    publish_folder,
    weights_digests,
)
from specdm_cli.pipeline.runs.registry import read_registry, record_run
from specdm_cli.pipeline.runs.run_manifest import (
    RUN_FILE,
    RunManifest,
    StageState,
    load_run,
    save_run,
)
from specdm_cli.stores import StoreReader, content_sha256, is_ours
from specdm_cli.stores.hints import train_split_hint

RunState = Literal["fresh", "resume", "overwrite"]
# `fit-vae --overwrite`: the old run, moved aside inside the folder, until the new run's first
# checkpoint commits; while it is being moved (either way) it is in OLD_RUN_MOVING.
OLD_RUN, OLD_RUN_MOVING = ".old-run", ".old-run-moving"


def prepare_run_dir(run: Path, resume: bool, overwrite: bool) -> RunState:
    """DESIGN.md's rules for an output folder, applied to a run directory."""
    refuse_resume_with_overwrite(resume, overwrite)
    if run.exists() and not run.is_dir():
        raise InputDataError("--run names a file, not a run folder", run, "choose another --run")
    if not run.exists() or (run.is_dir() and not any(run.iterdir())):
        return "fresh"
    if overwrite:
        if not is_ours(run, "run"):
            raise InputDataError(
                "refusing to overwrite a folder that is not a specdm run",
                run,
                "remove it yourself or choose another output",
            )
        return "overwrite"  # set aside under the run's lock (`set_aside`), not removed
    if not resume:
        raise InputDataError(
            "run directory already exists", run, "pass --resume, --overwrite or another --run"
        )
    if not (run / RUN_FILE).exists():
        raise ModelError("not a run directory: no run.json", run, "choose another --run")
    return "resume"


def set_aside(run: Path, lock: Path) -> None:
    """`--overwrite`: move the old run aside inside its folder (the new one starts empty); it
    goes at the new run's first checkpoint, and comes back if the new run stops before it."""
    refuse_if_locked(run, mine=lock)  # a reader of the old run would lose it under its feet
    moving = run / OLD_RUN_MOVING
    moving.mkdir()
    for entry in _run_entries(run):
        entry.rename(moving / entry.name)
    moving.rename(run / OLD_RUN)


def settle_old_run(run: Path) -> None:
    """The run set aside by `--overwrite` goes once run.json names the new VAE's checkpoint, else
    comes back whole (after a failure, or when a killed overwrite's lock is taken over). Each
    step leaves a state this function can finish: the folder's name says which it is."""
    old, moving = run / OLD_RUN, run / OLD_RUN_MOVING
    if old.is_dir():
        if _names_vae_checkpoint(run):
            remove_tree(old)
            return
        for entry in _run_entries(run):  # the new run's, which never checkpointed
            remove_tree(entry)
        old.rename(moving)
    if moving.is_dir():  # moved back whole: a kill part way through moves the rest next time
        for entry in moving.iterdir():
            entry.rename(run / entry.name)
        moving.rmdir()


def _run_entries(run: Path) -> list[Path]:
    """What a run folder holds but its locks and the old run set aside."""
    kept = (OLD_RUN, OLD_RUN_MOVING)
    return [e for e in run.iterdir() if e.name not in kept and not e.name.startswith(".specdm")]


def _names_vae_checkpoint(run: Path) -> bool:
    try:
        stage = load_run(run, verify=False).stages.get("vae")
    except ModelError:
        return False
    return stage is not None and stage.checkpoint is not None


def discard_untrained(run: Path, stage: str, created: bool) -> bool:
    """A fresh run that failed before its stage's first checkpoint: remove what it wrote (the
    folder, if this command created it), so the same command can simply be run again; as
    `prepare` removes a store that committed no sample. Called holding the run's RunLock (whose
    release then finds its file gone); a removal that fails leaves the run's own error to tell.
    Returns whether the run was discarded (False: it holds a checkpoint to resume from)."""
    if (run / RUN_FILE).is_file():
        try:
            state = load_run(run, verify=False).stages.get(stage)
        except (ModelError, InputDataError):
            return False  # not ours to judge: leave it
        if state is not None and state.checkpoint is not None:
            return False
    try:
        if created:
            remove_tree(run)
        else:  # an empty folder the user made: leave it empty
            for entry in run.iterdir():
                remove_tree(entry)
    except OSError:
        return False
    return True


class RunLock(DirLock):
    """The run directory's writer lock (the folder is created if needed).

    Whoever takes it first removes what a killed writer left: temporary files and unpublished
    checkpoint folders (`.<stage>-<step>.partial`), which a resume may never write again.
    """

    def __init__(self, run: Path):
        run.mkdir(parents=True, exist_ok=True)
        super().__init__(run)

    def acquire(self) -> None:
        super().acquire()
        remove_strays(self.path.parent)


def remove_strays(run: Path) -> None:
    """Temporary files, unpublished checkpoint folders, published ones run.json does not name;
    an old run a killed `--overwrite` set aside comes back (or goes, see `settle_old_run`)."""
    settle_old_run(run)
    remove_stray_temporaries(run)
    for partial in run.glob(".*.partial"):
        remove_tree(partial)
    try:
        manifest = load_run(run, verify=False)
    except ModelError:
        return  # no readable run.json: a fresh run, or one a later step refuses
    named = {stage.checkpoint for stage in manifest.stages.values()}
    for folder in (run / "checkpoints").glob("*"):
        if f"checkpoints/{folder.name}" not in named:
            remove_tree(folder)


def open_or_create_run(
    run: Path, reader: StoreReader, state: RunState, source_sha256: str, made_by: dict[str, Any]
) -> RunManifest:
    """The run's manifest: new for a fresh run, loaded (weights verified) for a resume."""
    content = content_sha256(reader)
    if state == "resume":
        manifest = load_run(run)
        if not manifest.trained_on(source_sha256, content):
            raise ModelError(
                "cannot resume: the run was trained on another store",
                run,
                "use its store or a new --run",
            )
        return manifest
    store = reader.manifest
    if store.normalization is None:
        raise InputDataError(
            "the store has no normalisation statistics (no train split)",
            reader.root,
            train_split_hint(store),
        )
    manifest = RunManifest(
        run_id=run.name,
        task=store.task,
        dataset=store.source.dataset if store.source else "synthetic",
        source_store=str(reader.root.resolve()),
        source_manifest_sha256=source_sha256,
        source_content_sha256=content,
        bands=store.bands,
        classes=store.classes,
        dtype=store.dtype,
        height=store.height,
        width=store.width,
        normalization=store.normalization,
        provenance=made_by,
    )
    save_run(run, manifest)
    return manifest


def recorded_options(run: Path, stage: str, model: type[BaseModel]) -> dict[str, Any] | None:
    """The options a run's stage was started with, to resume it with (None: nothing to resume);
    options that `model` (the stage's config) refuses are a damaged run (exit 4).

    Runs record every option (`details.options`, preset and steps included); older runs only
    the values a resume must match, which is what they return."""
    if not (run / RUN_FILE).is_file():
        return None
    state = load_run(run, verify=False).stages.get(stage)
    if state is None or state.checkpoint is None:
        return None
    options = state.details.get("options")
    recorded = dict(options) if isinstance(options, dict) else dict(state.config)
    try:
        model.model_validate(recorded)
    except ValidationError as error:
        raise ModelError(
            f"run.json records {stage} options that do not validate ({error.errors()[0]['msg']})",
            run / RUN_FILE,
            "resume with the run's original version of specdm, or train another run folder",
        ) from None
    return recorded


def check_resume(run: Path, recorded: dict[str, Any], requested: dict[str, Any]) -> None:
    """A resume must use the options the stage was started with (all but steps and schedules)."""
    if recorded != requested:
        changed = sorted(
            k for k in set(recorded) | set(requested) if recorded.get(k) != requested.get(k)
        )
        told = "; ".join(
            f"{_option(k)}: run {_shown(recorded.get(k))}, now {_shown(requested.get(k))}"
            for k in changed[:3]
        )
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ModelError(
            f"cannot resume: options differ from the run's ({told}{more})",
            run,
            "resume with the original options, or train another run folder (fit-vae --run NEW; for later stages a copy of this one)",
        )


def stage_to_resume(
    run: Path,
    stage: StageState,
    identity: dict[str, Any],
    steps: int,
    *,
    resume: bool,
    overwrite: bool,
    what: tuple[str, str],
) -> StageState | None:
    """A checkpointed stage of the run, for a command given --resume or --overwrite: None to
    train anew (--overwrite; its first checkpoint replaces the stage), the stage itself when
    the same command ran it to its steps (already complete, --resume or not) or to continue
    with --resume (the same identity, else exit 3); without --resume, exit 3. `what` names the
    stage ("a diffusion model") and what --overwrite does ("train a new one")."""
    if overwrite:
        return None
    if stage.finished and stage.step >= steps and stage.config == identity:
        return stage
    if not resume:
        raise InputDataError(
            f"the run already has {what[0]}",
            run,
            f"pass --resume to continue it, or --overwrite to {what[1]}",
        )
    check_resume(run, stage.config, identity)
    return stage


def _option(key: str) -> str:
    """A resume identity's key as the user sets it: a config field's option (a key that is no
    field, such as distill's teacher_weights, as it is)."""
    return train_option(key) if key in _TRAIN_FIELDS else key


_TRAIN_FIELDS = {
    *VAETrainConfig.model_fields,
    *DiffusionTrainConfig.model_fields,
    *DistillTrainConfig.model_fields,
}


def _shown(value: Any) -> str:
    """An option's value as a person typed it: lists comma-joined, a missing one as unset."""
    if value is None:
        return "unset"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def commit_checkpoint(
    run: Path,
    stage: str,
    step: int,
    write: Callable[[Path], None],
    identity: dict[str, Any],
    finished: bool,
    details: dict[str, Any],
) -> None:
    """Write a checkpoint folder aside, move it into place, then point run.json at it."""
    relative = f"checkpoints/{_unused_name(run / 'checkpoints', f'{stage}-{step:07d}')}"
    temp = run / f".{stage}-{step:07d}.partial"
    remove_tree(temp)
    temp.mkdir(parents=True)
    try:
        write(temp)
    except BaseException as exc:
        remove_tree(temp)  # never leave a half-written checkpoint folder
        raise _as_resource_error(exc, temp) from None
    (run / "checkpoints").mkdir(exist_ok=True)
    publish_folder(temp, run / relative)
    fault_point("checkpoint.after_publish")  # in place, but run.json still names the old one
    manifest = load_run(run, verify=False)
    manifest.stages[stage] = StageState(
        config=identity,
        step=step,
        finished=finished,
        checkpoint=relative,
        weights=weights_digests(run, run / relative),
        details=details,
    )
    save_run(run, manifest)
    settle_old_run(run)  # an old run `--overwrite` set aside goes now
    fault_point("checkpoint.after_commit")  # run.json names the new one; the old one is still there
    for old in (run / "checkpoints").glob(f"{stage}-*"):
        if old.name != Path(relative).name:
            shutil.rmtree(old, ignore_errors=True)


def _unused_name(checkpoints: Path, name: str) -> str:
    """`name`, else `name-2`, `name-3`...: the first no folder holds. The same step committed
    again (`fit-detail --overwrite`, `distill --overwrite`, a U-Net of an earlier VAE trained
    anew) must not replace the folder run.json names: a kill between the removal and the move
    left run.json naming a missing folder. The old one goes once run.json names the new one."""
    taken = {folder.name for folder in checkpoints.glob(f"{name}*")}
    fresh = (f"{name}-{n}" if n > 1 else name for n in range(1, len(taken) + 2))
    return next(candidate for candidate in fresh if candidate not in taken)


def _as_resource_error(exc: BaseException, where: Path) -> BaseException:
    """A full disk while saving a checkpoint is exit 5, whichever library reported it."""
    if isinstance(exc, OSError):
        return resource_error_from(exc, where) or exc
    if is_disk_full(exc):
        return ResourceError(
            "no space left on device", where, "free space, then rerun with --resume"
        )
    return exc


def register(run: Path, task: str, stage: str, can_sample: bool) -> None:
    """Add the run to the user's registry so later commands find it."""
    record_run(run, task, stage, can_sample)


def ensure_registered(run: Path, task: str, stage: str, can_sample: bool) -> None:
    """Register a run found already complete when the registry lacks it (its write failed
    when the run finished); an entry there, perhaps of a later stage, is kept as it is. Checked
    again under the registry's lock, so a stage finishing meanwhile is not undone."""
    if all(entry.get("path") != str(run.resolve()) for entry in read_registry()):
        record_run(run, task, stage, can_sample, keep_existing=True)
