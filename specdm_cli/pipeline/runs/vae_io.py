"""Save and load the two-stream VAE of a run directory (one diffusers folder per branch)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdm_cli.errors import ModelError
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.models.vae_config import VAEConfig
from specdm_cli.pipeline.runs.checkpoints import load_module, save_module
from specdm_cli.pipeline.runs.run_manifest import RunManifest

BRANCHES = {"image": "image_vae", "mask": "mask_vae", "joint": "joint_vae"}
# The mask-aware image decoder's conv on the label latent (not a diffusers model).
LABEL_TO_IMAGE = "label_to_image"


def save_vae(model: SpecDMVAE, folder: Path) -> None:
    """Each present branch as `<folder>/<branch>/` (config.json + safetensors)."""
    for branch, attribute in BRANCHES.items():
        module = getattr(model, attribute)
        if module is not None:
            save_module(module, folder / branch)
    if model.label_to_image is not None:
        (folder / LABEL_TO_IMAGE).mkdir(parents=True, exist_ok=True)
        save_file(model.label_to_image.state_dict(), folder / LABEL_TO_IMAGE / "model.safetensors")


def load_branches(model: SpecDMVAE, folder: Path) -> None:
    """Replace the model's branches with the ones saved in `folder`."""
    from diffusers import AutoencoderKL

    for branch, attribute in BRANCHES.items():
        if getattr(model, attribute) is not None:
            setattr(model, attribute, load_module(AutoencoderKL, folder / branch))
    if model.label_to_image is not None:
        path = folder / LABEL_TO_IMAGE / "model.safetensors"
        try:
            model.label_to_image.load_state_dict(load_file(path))
        except (OSError, RuntimeError, SafetensorError) as exc:
            raise ModelError(
                f"cannot load the mask-aware decoder's weights ({exc})".splitlines()[0],
                path,
                "re-train or restore the run",
            ) from None


def vae_config(manifest: RunManifest) -> VAEConfig:
    """The VAE architecture a run was trained with."""
    stage = manifest.stages.get("vae")
    if stage is None or "model" not in stage.details:
        raise ModelError("the run has no VAE", hint="run `specdm fit-vae` first")
    return VAEConfig.model_validate(manifest.vae_details().model)


def load_vae(run: Path, manifest: RunManifest, device: torch.device) -> SpecDMVAE:
    """The run's trained VAE (weights already verified by `load_run`), in eval mode."""
    stage = manifest.stages.get("vae")
    if stage is None or not stage.finished or stage.checkpoint is None:
        raise ModelError(
            "the run's VAE is not trained to the end", run, "finish `specdm fit-vae --resume`"
        )
    model = SpecDMVAE(vae_config(manifest))
    load_branches(model, run / stage.checkpoint)
    return model.to(device).eval()
