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


def test_a_resume_that_names_a_preset_trains_to_its_steps() -> None:
    """gpu and paper train their configs' step counts; named on a resume, a preset's steps
    replace the run's recorded count, as its other values do."""
    from specdm_cli.config import DiffusionTrainConfig, VAETrainConfig

    for presets, model in (
        (VAE_PRESETS, VAETrainConfig),
        (DIFFUSION_PRESETS, DiffusionTrainConfig),
    ):
        for name in ("gpu", "paper"):
            assert presets[name]["steps"] == model().steps
            recorded = {"preset": "cpu", "steps": 5}
            assert train_values(presets, name, Devices(), recorded, {})["steps"] == model().steps
        assert (
            train_values(presets, None, Devices(), {"preset": "gpu", "steps": 5}, {})["steps"] == 5
        )


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


def test_a_run_from_before_presets_resumes_with_its_values(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = run_cli(
        "fit-vae", store, "--run", run, "--preset", "gpu", *VAE_SHAPE, "--steps", "2", "-q"
    )
    assert code == 0, stderr
    manifest = json.loads((run / "run.json").read_text())
    del manifest["stages"]["vae"]["details"]["options"]  # as runs.json of older versions
    (run / "run.json").write_text(json.dumps(manifest))
    code, stdout, stderr = run_cli("fit-vae", store, "--run", run, "--resume", "--steps", "3",
                                   "--json", "-q")  # fmt: skip
    assert code == 0 and json.loads(stdout)["state"] == "resumed", stderr
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["vae"]["details"]["options"] = {"steps": "many"}  # damaged
    (run / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = run_cli("fit-vae", store, "--run", run, "--resume", "--steps", "4", "-q")
    assert code == 4 and "do not validate" in stderr and len(stderr.strip().splitlines()) == 1


def test_one_line_estimates_the_wall_time(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE_SHAPE, "--steps", "6")
    assert code == 0, stderr
    estimates = [line for line in stderr.splitlines() if "for the remaining" in line]
    assert len(estimates) == 1, stderr
    assert (
        estimates[0].startswith("fit-vae: about ") and "2 of 6 steps (preset cpu;" in estimates[0]
    )
    # The semantic term's segmenter trains first: its steps get their own line.
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "sem", *VAE_SHAPE,
                              "--steps", "6", "--semantic-steps", "6")  # fmt: skip
    estimates = [line for line in stderr.splitlines() if "for the remaining" in line]
    assert [line.split(":")[0] for line in estimates] == ["fit-vae segmenter", "fit-vae"], stderr
    # Its progress names the command once: it was `fit-vae: fit-vae segmenter 6/6`.
    assert "fit-vae segmenter 6/6 (100%)" in stderr and "fit-vae: fit-vae" not in stderr, stderr
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "quiet", *VAE_SHAPE,
                              "--steps", "6", "--quiet")  # fmt: skip
    assert code == 0 and stderr == ""


def test_the_estimate_is_progress_on_stderr_not_a_json_warning(store: Path, tmp_path: Path) -> None:
    """`--json`'s `warnings` held the estimate lines of fit-vae and fit-diffusion, so a pipeline
    could not take a non-empty list as a signal: they stay on stderr, out of the list."""
    run = tmp_path / "run"
    code, stdout, stderr = run_cli("fit-vae", store, "--run", run, *VAE_SHAPE, "--steps", "6",
                                   "--json")  # fmt: skip
    assert code == 0 and "fit-vae: about " in stderr, stderr
    assert json.loads(stdout)["warnings"] == []
    code, stdout, stderr = run_cli("fit-diffusion", run, *UNET_SHAPE, "--steps", "6", "--json")
    assert code == 0 and "fit-diffusion: about " in stderr, stderr
    assert json.loads(stdout)["warnings"] == []


def test_the_cpu_preset_is_the_demo_models_recipe() -> None:
    script = (Path(__file__).parents[1] / "examples" / "train_demo_models.sh").read_text()
    words = " ".join(script.replace("\\\n", " ").split())
    # The ss arm's defaults stand for the variables: VAE steps, lr and label channels, U-Net steps.
    words = words.replace('"$vae_steps"', "1500").replace('"$vae_lr"', "1e-3")
    words = words.replace('"$label_channels"', "3")
    words = words.replace('"${UNET_STEPS:-6000}"', "6000")
    vae_line = words[words.index("specdm fit-vae") : words.index("specdm fit-diffusion")]
    unet_line = words[words.index("specdm fit-diffusion") :].split(" }")[0]
    options = {
        "--image-blocks": "image_block_out_channels", "--mask-blocks": "mask_block_out_channels",
        "--norm-groups": "norm_num_groups", "--batch-size": "batch_size", "--lr": "lr",
        "--steps": "steps", "--unet-blocks": "block_out_channels", "--head-dim": "attention_head_dim",
        "--layers-per-block": "layers_per_block", "--prediction": "prediction",
        "--snr-gamma": "snr_gamma", "--mask-latent-channels": "mask_latent_channels",
        "--semantic-weight": "semantic_weight",
    }  # fmt: skip
    for line, preset in ((vae_line, VAE_PRESETS["cpu"]), (unet_line, DIFFUSION_PRESETS["cpu"])):
        given = dict(zip(line.split(), line.split()[1:], strict=False))
        recipe_fields = {field for option, field in options.items() if option in given}
        assert recipe_fields <= preset.keys(), "the recipe gives an option the preset lacks"
        for option, field in options.items():
            if option in given:
                value, text = preset[field], given[option]
                if isinstance(value, tuple):
                    assert text == ",".join(map(str, value)), option
                else:
                    assert type(value)(text) == value, option
    assert "--prediction v_prediction" in unet_line and "--unet-blocks 32,64,64" in unet_line
    assert "--semantic-weight 0.3" in vae_line and "--mask-latent-channels 3" in vae_line
    assert 'train ss "${VAE_STEPS_SS:-1500}" 1e-3 3 &' in words  # the ss arm is the preset
