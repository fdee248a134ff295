"""The `distill` stage: a K-step student of a run's U-Net, saved in the run beside its teacher.

The teacher's ODE trajectories are drawn once per call from the seed (so a resume regenerates
the same ones on the same thread count); every training step then regresses the student on
(trajectory, student step) pairs drawn from (seed, step). See `models/distillation.py`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdm_cli.config import Devices, DistillTrainConfig, Progress
from specdm_cli.errors import ModelError, UsageError, refuse_resume_with_overwrite
from specdm_cli.models.diffusion import EMA, ScheduleConfig, alphas_cumprod
from specdm_cli.models.distillation import (
    clean_target,
    predicted_clean,
    student_timesteps,
    teacher_trajectories,
)
from specdm_cli.pipeline.devices import autocast, torch_devices
from specdm_cli.pipeline.runs import rundirs as runs
from specdm_cli.pipeline.runs.checkpoints import load_module
from specdm_cli.pipeline.runs.run_manifest import RunManifest, load_run
from specdm_cli.pipeline.signals import StopFlag, stoppable
from specdm_cli.pipeline.train.common import LossScaler, step_seed
from specdm_cli.pipeline.train.driver import Schedule, check_resume_steps, estimating, train_loop
from specdm_cli.pipeline.train.unet_state import ema_copy, restore_unet_training, save_unet_training

TRAJECTORY_BATCH = 64  # teacher trajectories solved at once (a fixed grid: same floats each call)


@dataclass(frozen=True)
class DistillRequest:
    run: Path
    config: DistillTrainConfig
    resume: bool = False
    overwrite: bool = False  # replace the run's student (kept until the new one's checkpoint)
    devices: Devices = field(default_factory=Devices)


@dataclass
class DistillSummary:
    run: str
    state: str
    step: int
    steps: int
    student_steps: int
    seconds: float
    steps_per_second: float
    loss: float | None = None
    val_loss: float | None = None


class DistillTrainer:
    """The student (a copy of the teacher to start), its EMA, and the step over trajectories."""

    def __init__(
        self,
        teacher: Any,
        schedule: ScheduleConfig,
        teacher_weights: dict[str, str],
        config: DistillTrainConfig,
        device: torch.device,
        run: Path,
    ):
        self.config, self.device, self.run, self.rank = config, device, run, 0
        self.schedule, self.teacher_weights = schedule, teacher_weights
        self.timesteps = student_timesteps(config.student_steps, schedule.num_train_timesteps)
        alphas = alphas_cumprod(schedule).to(device, torch.float32)
        self.alpha_bar = alphas[self.timesteps]
        self.alpha_bar_next = torch.cat([alphas[self.timesteps[1:]], alphas.new_ones(1)])
        self.unet = copy.deepcopy(teacher).train().requires_grad_(True)
        self.ema = EMA(self.unet, config.ema_decay)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate())
        self.scaler = LossScaler(device, config.precision)
        self.trajectories = torch.empty(0)
        self.val = torch.empty(0)

    def draw_trajectories(self, teacher: Any, shape: tuple[int, ...], report: Progress) -> None:
        """The training and validation trajectories of the teacher, from the seed."""
        self.trajectories = self._solve(teacher, shape, self.config.trajectories, "train", report)
        self.val = self._solve(teacher, shape, self.config.val_trajectories, "val", report)

    def _solve(
        self, teacher: Any, shape: tuple[int, ...], count: int, stream: str, report: Progress
    ) -> torch.Tensor:
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, 0, stream))
        noise = torch.randn((count, *shape), generator=generator)
        solved = []
        for start in range(0, count, TRAJECTORY_BATCH):
            batch = noise[start : start + TRAJECTORY_BATCH].to(self.device)
            with autocast(self.device, self.config.precision):
                solved.append(
                    teacher_trajectories(
                        teacher, self.schedule, batch, self.timesteps, self.config.teacher_substeps
                    )
                )
            report(f"teacher {stream} trajectories", start + len(batch), count)
        return torch.cat(solved)

    def step(self, step: int) -> dict[str, float]:
        """One regression step on (trajectory, student step) pairs drawn from (seed, step)."""
        generator = torch.Generator().manual_seed(step_seed(self.config.seed, step, "batch"))
        size = (self.config.batch_size,)
        rows = torch.randint(0, len(self.trajectories), size, generator=generator)
        segments = torch.randint(0, len(self.timesteps), size, generator=generator)
        loss = self._loss(self.unet, rows, segments, self.trajectories)
        self.scaler.step(loss, self.optimizer)
        self.ema.update(self.unet)
        return {"loss": float(loss.detach())}

    def _loss(
        self, student: Any, rows: torch.Tensor, segments: torch.Tensor, trajectories: torch.Tensor
    ) -> torch.Tensor:
        """The weighted clean-latent error of `student` on (row, segment) pairs (CPU indices)."""
        noisy = trajectories[rows, segments].to(self.device)
        following = trajectories[rows, segments + 1].to(self.device)
        segments = segments.to(self.device)
        alpha_bar = self.alpha_bar[segments][:, None, None, None]
        alpha_bar_next = self.alpha_bar_next[segments][:, None, None, None]
        target = clean_target(noisy, following, alpha_bar, alpha_bar_next)
        t = torch.tensor(self.timesteps, device=self.device)[segments]
        with autocast(self.device, self.config.precision):
            output = student(noisy, t).sample.float()
        clean = predicted_clean(self.schedule.prediction_type, output, noisy, alpha_bar)
        # Truncated-SNR weights max(SNR, 1) on the clean-latent error (Salimans & Ho 2022).
        weight = (alpha_bar / (1 - alpha_bar)).clamp(min=1.0).flatten()
        return ((clean - target).pow(2).mean(dim=(1, 2, 3)) * weight).mean()

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """The EMA student's loss over every step of the held-out trajectories."""
        student = ema_copy(self).eval()
        rows = torch.arange(len(self.val)).repeat_interleave(len(self.timesteps))
        segments = torch.arange(len(self.timesteps)).repeat(len(self.val))
        total = 0.0
        for start in range(0, len(rows), self.config.batch_size):
            part = slice(start, start + self.config.batch_size)
            total += float(self._loss(student, rows[part], segments[part], self.val)) * len(
                rows[part]
            )
        return {"val_loss": total / max(1, len(rows))}

    def identity(self) -> dict[str, Any]:
        """What a resume must match: the options and the teacher."""
        return {**self.config.training_identity(), "teacher_weights": self.teacher_weights}

    def checkpoint(self, step: int, finished: bool) -> None:
        """EMA and training students, optimizer, scaler and EMA count, committed atomically."""

        def write(folder: Path) -> None:
            save_unet_training(folder, self, step)

        details = {
            "timesteps": self.timesteps,
            "teacher_weights": self.teacher_weights,
            "unet": json.loads(json.dumps(dict(self.unet.config), default=str)),
            "options": self.config.model_dump(mode="json"),  # what a --resume starts from
        }
        runs.commit_checkpoint(self.run, "distill", step, write, self.identity(), finished, details)


def distill(
    request: DistillRequest,
    stop: StopFlag,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda line: None,
    notice: Callable[[str], None] = lambda line: None,
) -> DistillSummary:
    """Draw the teacher's trajectories, then train (or resume) the student; `warn` takes
    warnings, `notice` progress lines such as the time estimate."""
    started = time.monotonic()
    refuse_resume_with_overwrite(request.resume, request.overwrite)
    device = torch_devices(request.devices.one("distill"))[0]
    run, config = request.run, request.config
    load_run(run, verify=False)  # a clear error before the lock creates anything
    with runs.RunLock(run):
        manifest = load_run(run)
        teacher, schedule, weights = _teacher(run, manifest, device)
        trainer = DistillTrainer(teacher, schedule, weights, config, device, run)
        stage = _stage_to_resume(run, manifest, request, trainer, warn)
        if stage is not None and stage.finished and stage.step >= config.steps:
            return DistillSummary(str(run), "already complete", stage.step, config.steps,
                                  config.student_steps, 0.0, 0.0)  # fmt: skip
        start = 0
        if stage is not None:
            start = restore_unet_training(run / str(stage.checkpoint), trainer, device)
            check_resume_steps(start, config.steps, "student")

        side = int(teacher.config.sample_size)
        shape = (int(teacher.config.in_channels), side, side)
        trainer.draw_trajectories(teacher, shape, stoppable(progress, stop))
        schedule_of_steps = Schedule(config.steps, config.val_every, config.checkpoint_every,
                                     "distill", "loss", (("stage", "distill"),))  # fmt: skip
        told = estimating(progress, notice, "distill", f"{config.student_steps}-step student")
        trained = train_loop(run, trainer, start, schedule_of_steps, stop, told)
    return DistillSummary(
        str(run), "resumed" if start else "trained", config.steps, config.steps,
        config.student_steps, round(time.monotonic() - started, 3), trained.steps_per_second,
        trained.last.get("loss"), trained.validation.get("val_loss"),
    )  # fmt: skip


def _teacher(
    run: Path, manifest: RunManifest, device: torch.device
) -> tuple[Any, ScheduleConfig, dict[str, str]]:
    """The run's EMA U-Net (frozen), its schedule and its weights' digests."""
    from diffusers import UNet2DModel

    stage = manifest.stages.get("diffusion")
    if stage is None or not stage.finished or stage.checkpoint is None:
        raise ModelError(
            "the run has no finished diffusion model to distill", run,
            "run `specdm fit-diffusion` to the end first",
        )  # fmt: skip
    details = manifest.diffusion_details()
    if details.mask_condition is not None:
        raise UsageError(
            "distill takes a U-Net trained without --mask-condition-rate; this run's also takes "
            "a mask", hint="distill a run trained without it",
        )  # fmt: skip
    teacher = load_module(UNet2DModel, run / stage.checkpoint / "unet").to(device).eval()
    teacher.requires_grad_(False)
    schedule = ScheduleConfig.model_validate(details.schedule)
    return teacher, schedule, dict(stage.weights)


def _stage_to_resume(
    run: Path,
    manifest: RunManifest,
    request: DistillRequest,
    trainer: DistillTrainer,
    warn: Callable[[str], None],
) -> Any:
    """The distill stage to continue (or None); refusals for a run already distilled."""
    stage = manifest.stages.get("distill")
    if stage is None or stage.checkpoint is None:
        return None
    if manifest.distill_details().teacher_weights != trainer.teacher_weights:
        # fit-diffusion trained on (or anew) since: nothing of the student carries over.
        warn("the run's student learned an earlier U-Net: distilling a new one")
        return None
    return runs.stage_to_resume(
        run, stage, trainer.identity(), request.config.steps,
        resume=request.resume, overwrite=request.overwrite, what=("a distilled student", "distill a new one"),
    )  # fmt: skip
