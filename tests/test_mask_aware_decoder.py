"""`fit-vae --mask-aware-decoder` (issue 20 §2-3): an image decoder that also reads the label
latent. The network's invariants, then real tiny runs through the CLI: run.json, resume
equality, fit-diffusion and synthesize on such a run, a damaged weights file. Last, the other
mask-branch option, `--unlabelled-class` (sparse labels), through the same commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from pydantic import ValidationError

from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.models.vae_config import VAEConfig
from tests.conftest import run_cli
from tests.fixtures.geotiff_folder import make_geotiff_folder
from tests.test_fit_vae_cli import fit, weights
from tests.test_models_vae import STATS, make_batch, tiny_config
from tests.test_synthesize import FAST, UNET


def aware_config(task: str = "ss") -> VAEConfig:
    plain = tiny_config(task, classes=4 if task == "ss" else 2)
    return plain.model_copy(update={"mask_aware_decoder": True})


def aware_and_plain(task: str) -> tuple[SpecDMVAE, SpecDMVAE]:
    """A mask-aware VAE and a plain one with the same branch weights."""
    torch.manual_seed(0)
    aware = SpecDMVAE(aware_config(task)).eval()
    plain = SpecDMVAE(tiny_config(task, classes=aware.config.num_classes)).eval()
    plain.image_vae.load_state_dict(aware.image_vae.state_dict())
    plain.mask_vae.load_state_dict(aware.mask_vae.state_dict())
    return aware, plain


@pytest.mark.parametrize("task", ["ss", "cd"])
def test_it_starts_as_the_papers_decoder_and_then_reads_the_label(task: str) -> None:
    aware, plain = aware_and_plain(task)
    config = aware.config
    batch = make_batch(config)
    with torch.no_grad():
        z = aware.encode_latent(batch)
        for name, value in plain.decode_joint(z).items():
            torch.testing.assert_close(aware.decode_joint(z)[name], value)
        assert aware.label_to_image is not None
        torch.nn.init.normal_(aware.label_to_image.weight)
        parts = aware.split_latent(z)
        other = aware.join_latent({**parts, config.label_name: -parts[config.label_name]})
        before, after = aware.decode_joint(z), aware.decode_joint(other)
        plain_before, plain_after = plain.decode_joint(z), plain.decode_joint(other)
    for name in config.image_names:  # cd: both phases read the change latent
        assert (before[name] - after[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(plain_before[name], plain_after[name])


def test_the_image_loss_trains_the_decoder_not_the_mask_encoder() -> None:
    aware, _plain = aware_and_plain("ss")
    aware.train()
    losses = aware.forward_losses(make_batch(aware.config), *STATS)
    losses["image/total"].backward()
    assert aware.label_to_image is not None and aware.label_to_image.weight.grad is not None
    assert aware.label_to_image.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in aware.mask_vae.parameters())


def test_it_needs_the_two_stream_vae(demo_ss_store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="two-stream"):
        VAEConfig.model_validate(
            {**tiny_config(single_stream=True).model_dump(), "mask_aware_decoder": True}
        )
    code, _stdout, stderr = fit(
        demo_ss_store, tmp_path / "run", "--steps", "1", "--single-stream", "--mask-aware-decoder"
    )
    assert code == 2 and "two-stream" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def test_runs_resume_and_record_it(demo_ss_store: Path, tmp_path: Path) -> None:
    assert fit(demo_ss_store, tmp_path / "whole", "--steps", "4", "--mask-aware-decoder")[0] == 0
    assert fit(demo_ss_store, tmp_path / "split", "--steps", "2", "--mask-aware-decoder")[0] == 0
    code, _stdout, stderr = fit(
        demo_ss_store, tmp_path / "split", "--steps", "4", "--resume", "--mask-aware-decoder"
    )
    assert code == 0, stderr
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    assert "label_to_image/model.safetensors:weight" in whole
    assert whole["label_to_image/model.safetensors:weight"].abs().sum() > 0  # trained from 0
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    stage = json.loads((tmp_path / "whole" / "run.json").read_text())["stages"]["vae"]
    assert stage["config"]["mask_aware_decoder"] is True
    assert stage["details"]["model"]["mask_aware_decoder"] is True
    assert any(
        Path(p).parts[-2:] == ("label_to_image", "model.safetensors") for p in stage["weights"]
    )
    assert fit(demo_ss_store, tmp_path / "plain", "--steps", "1")[0] == 0
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())["stages"]["vae"]
    assert "mask_aware_decoder" not in plain["config"]  # older runs keep their identity
    assert not any("label_to_image" in name for name in weights(tmp_path / "plain"))


def test_fit_diffusion_and_synthesize_on_a_mask_aware_run(
    demo_cd_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code, _stdout, stderr = fit(demo_cd_store, run, "--steps", "2", "--mask-aware-decoder")
    assert code == 0, stderr
    code, _stdout, stderr = run_cli("fit-diffusion", run, *UNET)
    assert code == 0, stderr
    code, _stdout, stderr = run_cli(
        "synthesize", "--model", run, "--n", "4", "--out", tmp_path / "syn.zarr", *FAST
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "syn.zarr" / "manifest.json").read_text())["count"] == 4
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    damaged = run / stage["checkpoint"] / "label_to_image" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8])
    code, _stdout, stderr = run_cli(
        "synthesize", "--model", run, "--n", "4", "--out", tmp_path / "again.zarr", *FAST
    )
    assert code == 4 and "label_to_image" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "again.zarr").exists()


def test_sparse_labels_through_fit_vae_unlabelled_class_to_synthesize(tmp_path: Path) -> None:
    # `fit-vae --unlabelled-class` on a store whose label 0 means "not labelled" (--label-nodata
    # 0): recorded in run.json, a mask branch of K + 1 channels, U-Net and synthesis run on it.
    raw = make_geotiff_folder(tmp_path / "raw", n=6, size=(16, 16), codes=[0, 1, 2])
    store = tmp_path / "sparse.zarr"
    code, _stdout, stderr = run_cli(
        "prepare", "geotiff", raw, "--out", store, "--label-nodata", "0", "--patch-size", "16",
        "--val-fraction", "0.2",
    )  # fmt: skip
    assert code == 0, stderr
    assert "of the train label pixels are unlabelled" in stderr and "--unlabelled-class" in stderr
    run = tmp_path / "run"
    code, _stdout, stderr = fit(store, run, "--steps", "2", "--unlabelled-class")
    assert code == 0, stderr
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    assert stage["config"]["unlabelled_class"] is True
    assert stage["details"]["model"]["unlabelled_class"] is True
    mask_weights = {k: v for k, v in weights(run).items() if k.startswith("mask/")}
    assert any(v.ndim == 4 and v.shape[1] == 3 for v in mask_weights.values())  # 2 classes + 1
    code, _stdout, stderr = run_cli("fit-diffusion", run, *UNET)
    assert code == 0, stderr
    out = tmp_path / "syn.zarr"
    code, _stdout, stderr = run_cli("synthesize", "--model", run, "--n", "4", "--out", out, *FAST)
    assert code == 0, stderr
    masks = np.asarray(zarr.open_group(str(out), mode="r")["mask"][:])
    assert set(np.unique(masks).tolist()) <= {0, 1, IGNORE_INDEX}
