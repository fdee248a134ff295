"""`--preset cpu|gpu|paper` of fit-vae and fit-diffusion: defaults by device, overrides, the
record in run.json, resume with the recorded recipe, and the wall-time estimate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from specdm_cli.config import Devices
from specdm_cli.presets import DIFFUSION_PRESETS, VAE_PRESETS, default_preset, train_values
from tests.conftest import prepare_demo, run_cli

# Widths small enough for 16 px scenes; the rest comes from the preset under test.
VAE_SHAPE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
             "--batch-size", "4", "--threads", "1", "--workers", "1",
             "--semantic-steps", "2")  # fmt: skip
UNET_SHAPE = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8",
              "--layers-per-block", "1", "--batch-size", "8", "--threads", "1")  # fmt: skip


def stage(run: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((run / "run.json").read_text())["stages"][name]
    return loaded


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("presets") / "ss.zarr", n=24, size=16)


def test_help_shows_each_presets_widths_and_steps() -> None:
    code, stdout, _ = run_cli("fit-vae", "--help")
    flat = " ".join(stdout.split())
    assert code == 0
    assert "cpu: widths 16,32,32 / 8,16,16, 1500 steps" in flat
    assert "gpu: widths 64,128,256 / 32,64,128, 20000 steps" in flat
    assert "paper: widths 128,256,512 / 128,256,512, 20000 steps" in flat
    code, stdout, _ = run_cli("fit-diffusion", "--help")
    flat = " ".join(stdout.split())
    assert "cpu: widths 32,64,64, 6000 steps" in flat and "gpu: widths by latent size" in flat


def test_device_picks_the_preset_and_given_options_win() -> None:
    assert default_preset(Devices()) == "cpu"
    assert default_preset(Devices("cpu", (), 2)) == "cpu"
    assert default_preset(Devices("cuda", (0,))) == "gpu"
    on_gpu = train_values(VAE_PRESETS, None, Devices("cuda", (0,)), None, {"steps": 7})
    assert on_gpu["preset"] == "gpu" and on_gpu["steps"] == 7
    assert on_gpu["image_block_out_channels"] == (64, 128, 256)
    # f = 8 takes one more level of the preset's widths (LDM kl-f8's repeated last width),
    # f = 2 one less.
    deeper = train_values(VAE_PRESETS, "cpu", Devices(), None, {"downsample": 8})
    assert deeper["image_block_out_channels"] == (16, 32, 32, 32)
    shallower = train_values(VAE_PRESETS, "cpu", Devices(), None, {"downsample": 2})
    assert shallower["mask_block_out_channels"] == (8, 16)
    paper = train_values(DIFFUSION_PRESETS, "paper", Devices(), None, {"lr": None})
    assert paper["prediction"] == "epsilon" and paper["snr_gamma"] == 0.0 and "lr" not in paper


def test_cpu_preset_is_the_cpu_default_and_recorded(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE_SHAPE, "--steps", "2", "-q")
    assert code == 0, stderr
    options = stage(run, "vae")["details"]["options"]
    assert options["preset"] == "cpu" and options["lr"] == 1e-3 and options["steps"] == 2
    assert options["checkpoint_every"] == 250  # the preset's, not the gpu default 1000
    assert options["image_block_out_channels"] == [8, 16, 16]  # the option, not the preset's
    # The demo recipe's ss arm (issue 20): a segmenter trained first, 3 label latent channels.
    assert options["semantic_weight"] == 0.3 and options["mask_latent_channels"] == 3
    assert stage(run, "vae")["details"]["segmenter"]["steps"] == 2
    code, _, stderr = run_cli("fit-diffusion", run, *UNET_SHAPE, "--steps", "2", "-q")
    assert code == 0, stderr
    diffusion = stage(run, "diffusion")["details"]
    assert diffusion["options"]["preset"] == "cpu"
    assert diffusion["schedule"]["prediction_type"] == "v_prediction"


def test_paper_preset_trains_the_ldm_recipe(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        "fit-vae", store, "--run", run, "--preset", "paper", *VAE_SHAPE, "--steps", "1", "-q"
    )
    assert code == 0, stderr
    details = stage(run, "vae")["details"]
    assert details["options"]["preset"] == "paper"
    assert details["latent_layout"] == [["image", 3], ["mask", 3]]  # LDM kl-f4's z_channels
    assert details["learning_rate"] == pytest.approx(4.5e-6 * 4)  # LDM's scaled rate


def test_a_resume_keeps_the_recorded_recipe(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        "fit-vae", store, "--run", run, "--preset", "gpu", *VAE_SHAPE, "--steps", "2", "-q"
    )
    assert code == 0, stderr
    # No widths, no preset: the CPU's default recipe would be another network; the run's is used.
    code, stdout, stderr = run_cli("fit-vae", store, "--run", run, "--resume", "--steps", "3",
                                   "--json", "-q")  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["state"] == "resumed"
    options = stage(run, "vae")["details"]["options"]
    assert options["preset"] == "gpu" and options["image_block_out_channels"] == [8, 16, 16]
    assert options["lr"] is None and options["steps"] == 3
    # Without --steps a resume aims at the recorded count: already there.
    code, stdout, stderr = run_cli("fit-vae", store, "--run", run, "--resume", "--json", "-q")
    assert code == 0 and json.loads(stdout)["state"] == "already complete", stderr
    code, _, stderr = run_cli("fit-vae", store, "--run", run, "--resume", "--preset", "cpu",
                              "--steps", "4", "-q")  # fmt: skip
    assert code == 4 and "cannot resume" in stderr, stderr
    # The line says what differs and both values, so the fix needs no look into run.json.
    # Named by the option that sets it (it was image_block_out_channels, which no option is).
    assert "--image-blocks: run 8,16,16, now " in stderr and len(stderr.splitlines()) <= 2


def test_each_training_field_is_named_by_the_option_of_its_command() -> None:
    """Refusals name a config field by `train_option`: an option a training command's --help
    lists, or the field itself where none sets it."""
    import typer.core
    import typer.main

    from specdm_cli.cli.app import app
    from specdm_cli.config import (
        DiffusionTrainConfig,
        DistillTrainConfig,
        VAETrainConfig,
        train_option,
    )

    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    commands = ("fit-vae", "fit-diffusion", "distill")
    flags = {
        opt for name in commands for param in group.commands[name].params for opt in param.opts
    }
    fields = {*VAETrainConfig.model_fields, *DiffusionTrainConfig.model_fields,
              *DistillTrainConfig.model_fields} - {"preset"}  # fmt: skip
    for field in fields:
        named = train_option(field)
        unset = named == field and f"--{field.replace('_', '-')}" not in flags
        assert named in flags or unset, field
