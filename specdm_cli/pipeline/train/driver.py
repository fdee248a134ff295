"""The one driver of `fit-vae`, `fit-diffusion` and `distill`: ranks, steps, metrics, checkpoints.

A stage plugs in a `Trainer` (its deterministic step, its validation, its checkpoint); the
driver owns everything else, so every stage stops, logs, checkpoints and resumes the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from specdm_cli.config import Progress
from specdm_cli.errors import Interrupted, UsageError
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.common import check_finite_loss
from specdm_cli.pipeline.train.distributed import launched_by_torchrun, run_ranks, stop_of_any_rank

Job = TypeVar("Job")
Result = TypeVar("Result")


class Trainer(Protocol):
    """What a stage gives the driver."""

    rank: int

    def step(self, step: int) -> dict[str, float]:
        """Train on batch `step`; the metrics record's fields (deterministic in (seed, step))."""
        ...

    def validate(self) -> dict[str, Any]:
        """Fields added to the record at a validation step (empty: nothing to validate on)."""
        ...

    def checkpoint(self, step: int, finished: bool) -> None:
        """Commit a checkpoint of `step` into the run (rank 0 only calls it)."""
        ...


@dataclass(frozen=True)
class Schedule:
    """When the driver validates and checkpoints, and what it names the progress and records."""

    steps: int
    val_every: int
    checkpoint_every: int
    progress_label: str  # "fit-vae" / "fit-diffusion"
    loss_key: str  # the record field that must stay finite
    record_fields: tuple[tuple[str, Any], ...] = ()  # fixed fields of every metrics record


@dataclass
class Trained:
    """What the loop leaves: the last step's record and validation, and the step rate."""

    last: dict[str, float]
    validation: dict[str, Any]
    steps_per_second: float


def launch(
    devices: list[torch.device],
    rank_main: Callable[[int, int, torch.device, Job, StopFlag | None, Progress | None], Result],
    job: Job,
    stop: StopFlag,
    progress: Progress | None,
) -> Result | None:
    """Train in this process on one device, else on one process per device (None: the ranks
    wrote their results into the run). Raises Interrupted when a signal stopped the training."""
    if len(devices) == 1 and not launched_by_torchrun():
        return rank_main(0, 1, devices[0], job, stop, progress)
    run_ranks(rank_main, devices, stop, job)
    return None


def check_resume_steps(start: int, steps: int, stage: str) -> None:
    """An unfinished stage resumed with --steps at or below the step it reached would train
    nothing and stay unfinished (and the next stage refuse the run): refused instead."""
    if start >= steps:
        raise UsageError(
            f"--steps {steps} is not above the step the run's {stage} reached ({start})",
            hint=f"resume with --steps {start + 1} or more, or train again with --overwrite",
        )


def train_loop(
    run: Path,
    trainer: Trainer,
    start: int,
    schedule: Schedule,
    stop: StopFlag,
    progress: Progress | None,
) -> Trained:
    """Steps [start, steps): log each, validate and checkpoint on schedule (rank 0), stop cleanly."""
    last: dict[str, float] = {}
    validation: dict[str, Any] = {}
    tick = time.monotonic()
    for step in range(start, schedule.steps):
        last = trainer.step(step)
        check_finite_loss(last[schedule.loss_key], step, run)
        done = step + 1
        # Read once, and agreed by all ranks: a signal landing later in this step is seen at
        # the next one, never half, and no rank steps on alone.
        stopping = stop_of_any_rank(stop.signum)
        if trainer.rank == 0:
            finished = done == schedule.steps
            record: dict[str, Any] = {**dict(schedule.record_fields), "step": done, **last}
            if done % schedule.val_every == 0 or finished:
                validation = trainer.validate() or validation
                record.update(validation)
            _append_metrics(run, record)
            if finished or done % schedule.checkpoint_every == 0 or stopping:
                trainer.checkpoint(done, finished)
        if progress:
            progress(schedule.progress_label, done, schedule.steps)
        if stopping:
            raise Interrupted(stopping)  # this rank's signal, or another rank's
    rate = (schedule.steps - start) / max(time.monotonic() - tick, 1e-9)
    return Trained(last, validation, round(rate, 3))


# Steps timed before the estimate: the first step (allocations, thread pools) is not among them.
ESTIMATE_AFTER_STEPS = 3


def estimating(
    progress: Progress | None, notice: Callable[[str], None], label: str, recipe: str
) -> Progress:
    """`progress`, plus one notice with the wall time the remaining steps of `label` will take,
    once ESTIMATE_AFTER_STEPS steps after the first have been timed; as much for each stage
    named after it that runs first (`fit-vae segmenter`: the semantic term's 300 steps)."""
    states: dict[str, dict[str, float]] = {}

    def update(stage: str, done: int, total: int) -> None:
        if progress:
            progress(stage, done, total)
        if stage.split()[0] != label:
            return
        state = states.setdefault(stage, {})
        if state.get("told"):
            return
        now = time.monotonic()
        if "start" not in state:
            state.update(start=now, start_done=done)
            return
        timed = done - state["start_done"]
        if timed >= ESTIMATE_AFTER_STEPS and total > done:
            per_step = (now - state["start"]) / timed
            notice(
                f"{stage}: about {_duration(per_step * (total - done))} for the remaining "
                f"{total - done} of {total} steps ({recipe}; {per_step:.3g} s a step over "
                f"{timed} steps, validation and checkpoints extra)"
            )
            state["told"] = 1

    return update


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _append_metrics(run: Path, record: dict[str, Any]) -> None:
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")
