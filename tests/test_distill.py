"""`specdm distill` and `synthesize --sampler distilled`: the student's maths, its stage in the
run, bit-exact resume, deterministic samples, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from specdm_cli.models.diffusion import ScheduleConfig, alphas_cumprod
from specdm_cli.models.distillation import (
    clean_target,
    ddim_step,
    predicted_clean,
    student_timesteps,
    teacher_grid,
)
from tests.conftest import run_cli
from tests.test_synthesize import arrays, synth, train_run

DISTILL = ("--trajectories", "8", "--batch-size", "4", "--threads", "2", "--quiet")


def test_student_timesteps_start_at_noise_and_the_teacher_grid_passes_through_them() -> None:
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(1) == [999]
    grid = teacher_grid([999, 749, 499, 249], 4)
    assert len(grid) == 16 and grid == sorted(grid, reverse=True)
    assert {999, 749, 499, 249} <= set(grid) and grid[-1] > 0
    with pytest.raises(ValueError, match="1 to 1000"):
        student_timesteps(0)


def test_the_clean_target_is_what_makes_the_ddim_step_land_on_the_teacher() -> None:
    generator = torch.Generator().manual_seed(0)
    noisy, teacher_next = torch.randn(2, 3, 4, 4, generator=generator)
    alphas = alphas_cumprod(ScheduleConfig()).float()
    for now, following in ((999, alphas[749]), (249, torch.tensor(1.0))):
        target = clean_target(noisy, teacher_next, alphas[now], following)
        assert torch.allclose(ddim_step(noisy, target, alphas[now], following), teacher_next,
                              atol=1e-4)  # fmt: skip
        # The v (and epsilon) a U-Net must output for that target implies it back.
        a = alphas[now]
        velocity = (a.sqrt() * noisy - target) / (1 - a).sqrt()
        assert torch.allclose(predicted_clean("v_prediction", velocity, noisy, a), target,
                              atol=1e-4)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("distill"), "ss")


def _copy(run: Path, target: Path) -> Path:
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns(".specdm.lock")))


@pytest.fixture(scope="module")
def distilled(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _copy(trained, tmp_path_factory.mktemp("student") / "run")
    code, _, stderr = run_cli("distill", run, "--steps", "4", *DISTILL)
    assert code == 0, stderr
    return run


def _student(run: Path) -> dict[str, torch.Tensor]:
    stage = json.loads((run / "run.json").read_text())["stages"]["distill"]
    return load_file(run / stage["checkpoint"] / "unet" / "diffusion_pytorch_model.safetensors")


def test_distill_records_a_student_beside_its_teacher(distilled: Path) -> None:
    stages = json.loads((distilled / "run.json").read_text())["stages"]
    stage = stages["distill"]
    assert stage["finished"] and stage["step"] == 4
    assert stage["details"]["timesteps"] == [999, 749, 499, 249]
    assert stage["details"]["teacher_weights"] == stages["diffusion"]["weights"]
    records = [json.loads(line) for line in (distilled / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("stage") == "distill"][-1]
    assert last["step"] == 4 and np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])
    teacher = stages["diffusion"]["checkpoint"]
    assert not all(
        torch.equal(value, load_file(distilled / teacher / "unet" /
                                     "diffusion_pytorch_model.safetensors")[key])
        for key, value in _student(distilled).items()
    )  # fmt: skip


def test_resume_continues_bit_exactly(trained: Path, distilled: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    assert run_cli("distill", run, "--steps", "2", *DISTILL)[0] == 0
    code, _, stderr = run_cli("distill", run, "--steps", "4", "--resume", *DISTILL)
    assert code == 0, stderr
    straight, resumed = _student(distilled), _student(run)
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


def test_distilled_samples_are_deterministic_and_recorded(distilled: Path, tmp_path: Path) -> None:
    # synth passes --steps 4, the student's own count.
    first, second = tmp_path / "a.zarr", tmp_path / "b.zarr"
    assert synth(distilled, first, "--n", "6", "--sampler", "distilled")[0] == 0
    code, _, stderr = synth(distilled, second, "--n", "3", "--sampler", "distilled")
    assert code == 0, stderr
    many, few = arrays(first), arrays(second)
    assert all(np.array_equal(many[name][:3], few[name]) for name in ("image", "mask"))
    model = json.loads((first / "manifest.json").read_text())["model"]
    assert model["sampler"] == "distilled" and model["steps"] == 4
    plain = tmp_path / "plain.zarr"
    assert synth(distilled, plain, "--n", "3")[0] == 0  # the teacher still samples
    assert not np.array_equal(arrays(plain)["image"], few["image"])


def test_refusals_are_one_line(trained: Path, distilled: Path, tmp_path: Path) -> None:
    code, _, stderr = run_cli("synthesize", "--model", distilled, "--sampler", "distilled",
                              "--steps", "3", "--n", "2", "--out", tmp_path / "x.zarr")  # fmt: skip
    assert code == 2 and "takes 4 steps, not 3" in stderr
    code, _, stderr = synth(trained, tmp_path / "y.zarr", "--n", "2", "--sampler", "distilled")
    assert code == 4 and "no finished distilled student" in stderr
    code, _, stderr = run_cli("distill", distilled, "--steps", "8", *DISTILL)
    assert code == 3 and "already has a distilled student" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "x.zarr").exists()
    stale = _copy(distilled, tmp_path / "stale")
    manifest = json.loads((stale / "run.json").read_text())
    manifest["stages"]["distill"]["details"]["teacher_weights"] = {"unet": "0" * 64}
    (stale / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = synth(stale, tmp_path / "z.zarr", "--n", "2", "--sampler", "distilled")
    assert code == 4 and "earlier U-Net" in stderr and "`specdm distill RUN` again" in stderr
    # The hint's command distils a new student (it said "pass --resume", which then refused).
    code, _, stderr = run_cli("distill", stale, "--steps", "2", "--trajectories", "8",
                              "--batch-size", "4", "--threads", "2")  # fmt: skip
    assert code == 0 and "learned an earlier U-Net: distilling a new one" in stderr, stderr
    assert synth(stale, tmp_path / "w.zarr", "--n", "2", "--sampler", "distilled")[0] == 0


def test_overwrite_distills_a_new_student_in_place(distilled: Path, tmp_path: Path) -> None:
    """Other options needed a copy of the run folder (the hint said so): --overwrite replaces
    the student, and nothing of the old one is left."""
    run = _copy(distilled, tmp_path / "run")
    code, _, stderr = run_cli("distill", run, "--steps", "2", "--resume", "--overwrite", *DISTILL)
    assert code == 2 and "exclude each other" in stderr
    # The command that made the student, with --overwrite, distils anew (was "already
    # complete"; fit-diffusion --overwrite trained a new U-Net).
    code, stdout, stderr = run_cli("distill", run, "--steps", "4", "--overwrite", "--json",
                                   *DISTILL)  # fmt: skip
    assert code == 0 and json.loads(stdout)["state"] == "trained", stderr
    code, _, stderr = run_cli(
        "distill", run, "--steps", "2", "--student-steps", "2", "--overwrite", *DISTILL
    )
    assert code == 0, stderr
    stage = json.loads((run / "run.json").read_text())["stages"]["distill"]
    assert stage["finished"] and stage["details"]["timesteps"] == [999, 499]
    # The same step's name was taken by the old student: the new one got a fresh one.
    assert [f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("distill-*")] == [
        stage["checkpoint"]
    ]
    out = tmp_path / "two.zarr"
    code, _, stderr = run_cli("synthesize", "--model", run, "--sampler", "distilled", "--n", "2",
                              "--batch-size", "2", "--threads", "2", "--quiet", "--out", out)  # fmt: skip
    assert code == 0, stderr
    assert json.loads((out / "manifest.json").read_text())["model"]["steps"] == 2


def test_auto_takes_the_student_unless_steps_are_asked_for(
    trained: Path, distilled: Path, tmp_path: Path
) -> None:
    said: list[str] = []

    def sampler_of(run: Path, name: str, *extra: str) -> tuple[str, int]:
        out = tmp_path / name
        code, stdout, stderr = run_cli("synthesize", "--model", run, "--out", out, "--n", "2",
                                       "--threads", "2", "--quiet", "--json", *extra)  # fmt: skip
        assert code == 0, stderr
        said.extend(line for line in json.loads(stdout)["warnings"] if line.startswith("sampler"))
        model = json.loads((out / "manifest.json").read_text())["model"]
        return model["sampler"], model["steps"]

    assert sampler_of(distilled, "student.zarr") == ("distilled", 4)
    assert sampler_of(distilled, "asked.zarr", "--steps", "3") == ("dpmpp", 3)
    assert sampler_of(trained, "teacher.zarr") == ("dpmpp", 10)
    # The same command samples otherwise once a run is distilled: it says which, every time.
    assert said == [
        "sampler: distilled (the run's distilled student; --sampler auto)",
        "sampler: dpmpp (--steps asks for a step count; --sampler auto)",
        "sampler: dpmpp (no current student; --sampler auto)",
    ]


def test_distill_takes_one_device_and_its_help_says_so(trained: Path) -> None:
    code, stdout, _ = run_cli("distill", "--help")
    words = " ".join(stdout.split())  # the help wraps at the terminal's width
    assert code == 0 and "--gpus 0|cpu" in words and "this command runs on one device" in words
    code, _, stderr = run_cli("distill", trained, "--gpus", "cpu:2")
    assert code == 2 and "distill runs on one device" in stderr


def test_a_store_begun_before_distill_resumes_to_the_same_bytes(
    trained: Path, tmp_path: Path
) -> None:
    """Distilling a run while a synthesis of it is half done: the resume (--sampler auto) goes
    on with the sampler and weights it began with; a changed U-Net is still refused."""
    import os
    import signal
    import sys

    from tests import processes

    run = _copy(trained, tmp_path / "run")
    whole, out = tmp_path / "whole.zarr", tmp_path / "half.zarr"
    assert synth(run, whole, "--n", "12")[0] == 0
    command = [sys.executable, "-m", "specdm_cli", "synthesize", "--model", str(run),
               "--out", str(out), "--n", "12", "--steps", "4", "--batch-size", "4",
               "--threads", "2", "--quiet"]  # fmt: skip
    env = {**os.environ, "SPECDM_FAULT": "synthesize.after_batch:1"}
    assert processes.run(command, env=env).returncode == -signal.SIGKILL
    assert run_cli("distill", run, "--steps", "4", *DISTILL)[0] == 0
    resume = ["synthesize", "--model", run, "--n", "12", "--batch-size", "4", "--threads", "2"]
    code, _, stderr = run_cli(*resume, "--steps", "4", "--out", out)
    assert code == 0, stderr
    assert "sampler: dpmpp (the store's, begun with it; --sampler auto)" in stderr
    for name in ("image", "mask", "written"):
        np.testing.assert_array_equal(arrays(whole)[name], arrays(out)[name], err_msg=name)
    # Without a store to go on from, auto takes the new student.
    code, _, stderr = run_cli("synthesize", "--model", run, "--out", tmp_path / "new.zarr",
                              "--n", "4", "--threads", "2")  # fmt: skip
    assert code == 0 and "sampler: distilled" in stderr, stderr
    # A U-Net trained on since the store was begun is another model: refused.
    again = tmp_path / "again.zarr"
    command[command.index(str(out))] = str(again)
    assert processes.run(command, env=env).returncode == -signal.SIGKILL
    code, _, stderr = run_cli("fit-diffusion", run, "--resume", "--steps", "6", "--quiet")
    assert code == 0, stderr
    code, _, stderr = run_cli(*resume, "--steps", "4", "--out", again)
    assert code == 3 and "another synthesis plan" in stderr and "--model" in stderr
    assert "--sampler:" not in stderr  # the store's sampler, dpmpp, was taken again
    assert "trained on since the store was begun" in stderr
