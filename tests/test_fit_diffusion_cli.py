"""`specdm fit-diffusion` end to end: latent cache, EMA, bit-exact resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from specdm_cli.pipeline.runs.run_manifest import load_run
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.train.common import load_batch, to_tensors
from specdm_cli.pipeline.train.latent_cache import open_cache
from specdm_cli.stores import open_store
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line

VAE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
       *PAPER_LOSS,
       "--batch-size", "8", "--lr", "1e-2", "--threads", "2", "--quiet")  # fmt: skip
UNET = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8", "--layers-per-block", "1",
        "--batch-size", "8", "--lr", "1e-3", "--threads", "2", "--quiet")  # fmt: skip


def _vae_run(root: Path, *extra: str, task: str = "ss") -> Path:
    store = prepare_demo(root / f"{task}.zarr", n=32, size=16, task=task)
    run = root / "vae-run"
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, "--steps", "8", *extra)
    assert code == 0, stderr
    return run


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _vae_run(tmp_path_factory.mktemp("vae"))


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".specdm.lock"))
    return target


def diffuse(run: Path, *extra: str) -> tuple[int, dict[str, object], str]:
    code, stdout, stderr = run_cli("fit-diffusion", run, *UNET, "--json", *extra)
    return code, json.loads(stdout) if code == 0 else {}, stderr


def unet_weights(run: Path) -> dict[str, torch.Tensor]:
    stage = json.loads((run / "run.json").read_text())["stages"]["diffusion"]
    folder = run / stage["checkpoint"]
    return {
        f"{sub}:{k}": v
        for sub in ("unet", "train_unet")
        for k, v in load_file(folder / sub / "diffusion_pytorch_model.safetensors").items()
    }


def test_cache_scales_and_run_manifest(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    code, summary, stderr = diffuse(run, "--steps", "3")
    assert code == 0, stderr
    assert summary["cache"] == "built" and len(summary["latent_scale"]) == 7  # type: ignore[arg-type]
    stage = json.loads((run / "run.json").read_text())["stages"]["diffusion"]
    assert stage["finished"] and stage["details"]["schedule"]["beta_schedule"] == "scaled_linear"
    assert (
        stage["details"]["cached_views"] == 8 * 32 * 8 // 10
        or stage["details"]["cached_views"] % 8 == 0
    )
    code, summary, _ = diffuse(run, "--steps", "5", "--resume")
    assert code == 0 and summary["cache"] == "reused"


def test_the_outcome_line_agrees_with_the_json_summary(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    loud = tuple(option for option in UNET if option != "--quiet")
    code, stdout, stderr = run_cli(
        "fit-diffusion", run, *loud, "--steps", "2", "--val-every", "1", "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["val_loss"] is not None and summary["step"] == 2
    assert stderr.strip().splitlines()[-1] == (
        f"{summary['state']}: {summary['run']} at step 2 (latent cache built, "
        f"val loss {summary['val_loss']:.4f})"
    )
    # The cache's progress counts views: it says so, so the count is not taken for samples.
    views = json.loads((run / "run.json").read_text())["stages"]["diffusion"]["details"]
    samples = views["cached_views"] // 8
    assert f"encode latents ({samples} samples x 8 views) {samples * 8}/{samples * 8}" in stderr


def test_a_unet_of_an_earlier_vae_is_not_sampled_but_retrained(
    vae_run: Path, tmp_path: Path
) -> None:
    # fit-vae --resume --steps more changes the VAE under a finished U-Net: its samples would
    # decode through a VAE it never saw, and fit-diffusion used to answer "already complete".
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "2")[0] == 0
    store = json.loads((run / "run.json").read_text())["source_store"]
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, "--steps", "10", "--resume")
    assert code == 0, stderr
    synth = ("synthesize", "--model", run, "--n", "2", "--steps", "1", "--quiet")
    code, _, stderr = run_cli(*synth, "--out", tmp_path / "stale.zarr")
    assert_one_error_line(code, stderr, 4, "learned the latents of an earlier VAE")
    assert not (tmp_path / "stale.zarr").exists()
    loud = tuple(option for option in UNET if option != "--quiet")
    code, stdout, stderr = run_cli("fit-diffusion", run, *loud, "--steps", "2", "--json")
    assert code == 0 and json.loads(stdout)["state"] == "trained", stderr
    assert "learned the latents of an earlier VAE: training a new one" in stderr
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["diffusion"]["details"]["vae_weights"] == stages["vae"]["weights"]
    assert run_cli(*synth, "--out", tmp_path / "fresh.zarr")[0] == 0


def test_the_unet_sees_centred_unit_latents(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    code, summary, stderr = diffuse(run, "--steps", "2")
    assert code == 0, stderr
    means = np.asarray(zarr.open_group(run / "latents.zarr", mode="r")["mean"][:], np.float64)
    shift, scale = (
        np.asarray(summary[k])[None, :, None, None] for k in ("latent_shift", "latent_scale")
    )
    seen = (means - shift) * scale
    assert np.abs(seen.mean(axis=(0, 2, 3))).max() < 1e-4
    assert np.allclose(seen.std(axis=(0, 2, 3)), 1, atol=1e-3)
    details = json.loads((run / "run.json").read_text())["stages"]["diffusion"]["details"]
    assert details["latent_shift"] == summary["latent_shift"]


def test_a_cache_without_its_shift_is_rebuilt(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "2")[0] == 0
    group = zarr.open_group(run / "latents.zarr", mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != "shift"})
    code, summary, stderr = diffuse(run, "--steps", "3", "--resume")
    assert code == 0, stderr
    assert summary["cache"] == "built"


def test_a_v_prediction_run_trains_and_samples(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    code, summary, stderr = diffuse(
        run, "--steps", "4", "--val-every", "4", "--prediction", "v_prediction"
    )
    assert code == 0, stderr
    # The val loss is the epsilon error the v output implies: on the scale of an epsilon run's.
    assert 0 < summary["val_loss"] < 2  # type: ignore[operator]
    details = json.loads((run / "run.json").read_text())["stages"]["diffusion"]["details"]
    assert details["schedule"]["prediction_type"] == "v_prediction"
    out = tmp_path / "syn.zarr"
    code, _, stderr = run_cli(
        "synthesize", "--model", run, "--out", out, "--n", "2", "--steps", "3", "--quiet"
    )
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"]
    assert manifest["model"]["details"]["schedule"]["prediction_type"] == "v_prediction"
    code, _, stderr = diffuse(copy_run(vae_run, tmp_path / "bad"), "--prediction", "x0")
    assert code == 2 and "--prediction" in stderr


def test_snr_gamma_is_part_of_the_training_identity(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "2")[0] == 0
    code, _, stderr = diffuse(run, "--steps", "4", "--resume", "--snr-gamma", "0")
    assert code == 4 and "snr_gamma" in stderr
    code, _, stderr = diffuse(copy_run(vae_run, tmp_path / "bad"), "--snr-gamma", "-1")
    assert code == 2 and "--snr-gamma" in stderr


def test_another_store_builds_its_cache_but_never_under_a_trained_unet(
    vae_run: Path, tmp_path: Path
) -> None:
    """A resume with another store rebuilt the cache and went on training the U-Net on latents
    of another scale, exit 0; a store of another kind crashed (exit 1, "a bug")."""
    other = prepare_demo(tmp_path / "other.zarr", "--seed", "9", n=24, size=16)
    run = copy_run(vae_run, tmp_path / "run")
    code, summary, stderr = diffuse(run, "--steps", "2", "--store", str(other))
    assert code == 0, stderr
    assert summary["cache"] == "built"
    recorded = json.loads((run / "run.json").read_text())["stages"]["diffusion"]["details"]
    assert recorded["latent_store"]["path"] == str(other.resolve())
    code, _, stderr = diffuse(run, "--steps", "3", "--resume")  # the VAE's own store
    assert_one_error_line(code, stderr, 4, "learned the latents of another store")
    assert diffuse(run, "--steps", "3", "--resume", "--store", str(other))[0] == 0
    # That store prepared again by the same command: another manifest digest, the same data.
    again = prepare_demo(tmp_path / "again.zarr", "--seed", "9", n=24, size=16)
    manifest = json.loads((again / "manifest.json").read_text())
    manifest["provenance"]["created"] = "later"
    (again / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = diffuse(run, "--steps", "4", "--resume", "--store", str(again))
    assert code == 0, stderr
    cd = prepare_demo(tmp_path / "cd.zarr", n=24, size=16, task="cd")
    code, _, stderr = diffuse(copy_run(vae_run, tmp_path / "fresh"), "--store", str(cd))
    assert_one_error_line(code, stderr, 3, "task, classes differ from those the run's VAE")


def test_two_plus_two_steps_equal_four_with_ema(vae_run: Path, tmp_path: Path) -> None:
    whole = copy_run(vae_run, tmp_path / "whole")
    split = copy_run(vae_run, tmp_path / "split")
    assert diffuse(whole, "--steps", "4")[0] == 0
    assert diffuse(split, "--steps", "2")[0] == 0
    code, summary, stderr = diffuse(split, "--steps", "4", "--resume")
    assert code == 0 and summary["state"] == "resumed", stderr
    first, second = unet_weights(whole), unet_weights(split)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_loss_and_val_loss_fall(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    # LDM's epsilon targets (the gpu preset): within 60 steps their loss falls clearly, where the
    # cpu preset's min-SNR-weighted v loss fell 3% (its weights start it near its floor).
    code, summary, stderr = diffuse(
        run, "--steps", "60", "--lr", "3e-3", "--val-every", "20", "--preset", "gpu"
    )
    assert code == 0, stderr
    records = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"diffusion"' in line
    ]
    losses = [record["loss"] for record in records]
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10
    val = {record["step"]: record["val_loss"] for record in records if "val_loss" in record}
    assert list(val) == [20, 40, 60] and summary["val_loss"] == val[60]
    assert val[60] < val[20]


def test_mask_conditioning_trains_records_and_resumes(vae_run: Path, tmp_path: Path) -> None:
    whole = copy_run(vae_run, tmp_path / "whole")
    code, summary, stderr = diffuse(
        whole, "--steps", "4", "--val-every", "2", "--mask-condition-rate", "0.5"
    )
    assert code == 0, stderr
    stage = json.loads((whole / "run.json").read_text())["stages"]["diffusion"]
    condition = stage["details"]["mask_condition"]
    assert condition == {"rate": 0.5, "channels": condition["channels"], "array": "mask"}
    # The input: 7 latent channels, then the label latent (the last `channels`) and its flag.
    assert stage["details"]["unet"]["in_channels"] == 7 + condition["channels"] + 1
    assert stage["details"]["unet"]["out_channels"] == 7
    assert stage["config"]["mask_condition_rate"] == 0.5
    assert 0 < summary["val_loss_given_mask"] < 2  # type: ignore[operator]
    split = copy_run(vae_run, tmp_path / "split")
    assert diffuse(split, "--steps", "2", "--mask-condition-rate", "0.5")[0] == 0
    code, summary, stderr = diffuse(split, "--steps", "4", "--val-every", "2", "--resume")
    assert code == 0 and summary["state"] == "resumed", stderr  # the rate comes from run.json
    first, second = unet_weights(whole), unet_weights(split)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    code, _, stderr = diffuse(split, "--steps", "6", "--resume", "--mask-condition-rate", "0")
    assert code == 4 and "--mask-condition-rate: run 0.5, now unset" in stderr


def test_an_unconditioned_run_records_no_condition(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "2")[0] == 0
    stage = json.loads((run / "run.json").read_text())["stages"]["diffusion"]
    # No key at all: runs from before the option resume with the same training identity.
    assert "mask_condition_rate" not in stage["config"] and "mask_condition" not in stage["details"]
    assert stage["details"]["unet"]["in_channels"] == 7
    code, _, stderr = diffuse(copy_run(vae_run, tmp_path / "bad"), "--mask-condition-rate", "1.5")
    assert code == 2 and "--mask-condition-rate" in stderr and "Traceback" not in stderr


def test_single_stream_chain(tmp_path: Path) -> None:
    run = _vae_run(tmp_path, "--single-stream", task="cd")
    code, _, stderr = diffuse(run, "--steps", "2", "--mask-condition-rate", "0.5")
    assert code == 2 and "two-stream" in stderr and "Traceback" not in stderr
    code, summary, stderr = diffuse(run, "--steps", "2")
    assert code == 0, stderr
    assert len(summary["latent_scale"]) == 11  # type: ignore[arg-type]


def test_a_downsample_2_chain_keeps_half_the_side_in_its_latents(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "ss.zarr", n=32, size=16)
    run = tmp_path / "run"
    f2 = ("--downsample", "2", "--image-blocks", "8,16", "--mask-blocks", "8,8")  # override VAE's
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, *f2, "--steps", "2")
    assert code == 0, stderr
    assert diffuse(run, "--steps", "2")[0] == 0
    assert zarr.open_group(run / "latents.zarr", mode="r")["mean"].shape[-2:] == (8, 8)
    out = tmp_path / "syn.zarr"
    code, _, stderr = run_cli("synthesize", "--model", run, "--out", out, "--n", "2", "--quiet")
    assert code == 0, stderr
    assert zarr.open_group(out, mode="r")["image"].shape == (2, 10, 16, 16)


def test_refusals(vae_run: Path, tmp_path: Path) -> None:
    code, _, stderr = diffuse(tmp_path, "--steps", "2")
    assert code == 4 and "run.json" in stderr
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "2")[0] == 0
    code, summary, stderr = diffuse(run, "--steps", "2")  # the same command again
    assert code == 0 and summary["state"] == "already complete", stderr
    code, _, stderr = diffuse(run, "--steps", "4")  # an existing output, as fit-vae's run folder
    assert code == 3 and "already has a diffusion model" in stderr and "--resume" in stderr
    code, _, stderr = diffuse(run, "--steps", "4", "--resume", "--ema-decay", "0.99")
    assert code == 4 and "--ema-decay: run 0.9999, now 0.99" in stderr


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (("--unet-blocks", "7"), "norm groups must divide every U-Net width (7,)"),
        (("--unet-blocks", "16,32", "--norm-groups", "12"), "(--norm-groups, --unet-blocks)"),
        (("--norm-groups", "0"), "--norm-groups: Input should be greater"),
        (("--head-dim", "0"), "--head-dim: Input should be greater"),
    ],
)
def test_a_unet_groupnorm_cannot_split_is_a_usage_error_naming_the_options(
    vae_run: Path, tmp_path: Path, options: tuple[str, ...], words: str
) -> None:
    """--unet-blocks 7 stopped in GroupNorm as "a bug" (exit 1); field names were told as
    options that do not exist (--norm-num-groups, --attention-head-dim)."""
    run = copy_run(vae_run, tmp_path / "run")
    code, _, stderr = diffuse(run, "--steps", "1", *options)
    assert code == 2 and words in stderr and "Traceback" not in stderr, stderr
    assert "diffusion" not in json.loads((run / "run.json").read_text())["stages"]


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 20-30 s
def test_two_cpu_ranks_share_the_fit_vae_code_path(vae_run: Path, tmp_path: Path) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    code, summary, stderr = diffuse(run, "--steps", "2", "--gpus", "cpu:2")
    assert code == 0, stderr
    stage = json.loads((run / "run.json").read_text())["stages"]["diffusion"]
    assert stage["finished"] and stage["step"] == 2
    assert summary["cache"] == "built"


def test_another_store_is_encoded_with_the_statistics_the_vae_learnt(
    vae_run: Path, tmp_path: Path
) -> None:
    """`--store OTHER` normalised OTHER's images by OTHER's band statistics, not the run's: the
    VAE saw other inputs than it learnt, and synthesize denormalises with the run's."""
    other = prepare_demo(tmp_path / "other.zarr", "--seed", "9", n=24, size=16)
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "1", "--store", str(other))[0] == 0
    manifest = load_run(run)
    reader = open_store(other)
    assert manifest.normalization is not None and reader.manifest.normalization is not None
    assert manifest.normalization.mean != reader.manifest.normalization.mean
    vae, cpu = load_vae(run, manifest, torch.device("cpu")), torch.device("cpu")
    first = load_batch(reader, reader.indices("train")[:1], None)
    mean, std = (torch.tensor(v) for v in (manifest.normalization.mean, manifest.normalization.std))
    with torch.no_grad():
        posteriors = vae.encode(to_tensors(first, "ss", mean, std, cpu)[0])
        expected = vae.join_latent({k: p.mean for k, p in posteriors.items()}).numpy()
    np.testing.assert_allclose(open_cache(run).mean[0], expected[0], atol=1e-5)


def test_a_resume_with_steps_at_or_below_the_step_reached_is_refused(
    vae_run: Path, tmp_path: Path
) -> None:
    """An unfinished stage resumed with fewer --steps trained nothing, said "resumed" (exit 0,
    a negative step rate) and stayed unfinished, so the next stage refused the run."""
    run = copy_run(vae_run, tmp_path / "run")
    assert diffuse(run, "--steps", "4")[0] == 0
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["diffusion"]["finished"] = False  # as a run stopped at step 4 of 8
    (run / "run.json").write_text(json.dumps(manifest))
    for steps in ("3", "4"):
        code, _, stderr = diffuse(run, "--steps", steps, "--resume")
        assert_one_error_line(code, stderr, 2, f"--steps {steps} is not above the step")
    code, summary, stderr = diffuse(run, "--steps", "5", "--resume")
    assert code == 0 and summary["step"] == 5, stderr


def test_a_store_without_samples_of_the_vae_s_split_is_refused_before_a_cache(
    vae_run: Path, tmp_path: Path
) -> None:
    """A synthetic store (no train split) crashed the cache build ("unexpected ValueError")
    and left a cache marked complete with NaN statistics."""
    empty = prepare_demo(
        tmp_path / "val-only.zarr",
        "--val-fraction",
        "0.5",
        "--test-fraction",
        "0.49",
        n=24,
        size=16,
    )
    assert len(open_store(empty).indices("train")) == 0
    run = copy_run(vae_run, tmp_path / "run")
    code, _, stderr = diffuse(run, "--store", str(empty), "--steps", "1")
    assert_one_error_line(code, stderr, 3, "no 'train' samples")
    assert not (run / "latents.zarr").exists()


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_learning_rate_that_is_not_finite_is_a_usage_error(
    vae_run: Path, tmp_path: Path, value: str
) -> None:
    code, _, stderr = diffuse(copy_run(vae_run, tmp_path / "run"), "--lr", value)
    assert_one_error_line(code, stderr, 2, "--lr")
