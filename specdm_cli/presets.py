"""Training recipes (`--preset`): each stage's values over its config's defaults, and how a
preset, a resumed run's record and the options given combine."""

from __future__ import annotations

from typing import Any

from specdm_cli.config import Devices, DiffusionTrainConfig, TrainPreset, VAETrainConfig

# Training recipes (`--preset`): values over the configs' defaults; explicit options win.
# "cpu" is examples/train_demo_models.sh's recipe, which trains the shipped demo models in
# 15 + 21 min on 2 cores at 64 px (ours, 2026-12-02); that script gives cd 750 VAE steps at lr
# 2e-3, the preset the ss values that suit both. "gpu" is the configs' own defaults, the
# widths and steps written out (steps read from the configs). "paper" follows LDM, as the
# paper's Sec. 4.1 says it does: kl-f4 autoencoders (ch 128, ch_mult 1,2,4, z_channels 3) for
# both branches, LDM's batch of 12 per GPU on the paper's 4 GPUs, epsilon targets with LDM's
# plain mean loss; the paper gives no step counts, so they are the configs'.
# A preset names its steps even where they are its config's: a resume that names a preset
# trains to that preset's steps, not to the run's recorded count (train_values).
_VAE_STEPS: int = VAETrainConfig.model_fields["steps"].default
_UNET_STEPS: int = DiffusionTrainConfig.model_fields["steps"].default
VAE_PRESETS: dict[TrainPreset, dict[str, Any]] = {
    "cpu": {
        "image_block_out_channels": (16, 32, 32),
        "mask_block_out_channels": (8, 16, 16),
        "norm_num_groups": 8,
        "batch_size": 16,
        "lr": 1e-3,
        "steps": 1500,
        "val_every": 250,
        "checkpoint_every": 250,
        # Issue 20: the semantic term raised the round-trip utility of the demo VAEs and the
        # pairs' agreement (docs/measurements.md). 8 label channels raised the ss ceiling too,
        # but a segmenter pretrained on their pairs scored less (docs/measurements.md, "The ss
        # demo model goes back"): the recipe gives them to cd only.
        "mask_latent_channels": 3,
        "semantic_weight": 0.3,
    },
    "gpu": {
        "image_block_out_channels": (64, 128, 256),
        "mask_block_out_channels": (32, 64, 128),
        "steps": _VAE_STEPS,
    },
    "paper": {
        "image_block_out_channels": (128, 256, 512),
        "mask_block_out_channels": (128, 256, 512),
        "image_latent_channels": 3,
        "mask_latent_channels": 3,
        "batch_size": 48,
        "steps": _VAE_STEPS,
    },
}
DIFFUSION_PRESETS: dict[TrainPreset, dict[str, Any]] = {
    "cpu": {
        "block_out_channels": (32, 64, 64),
        "norm_num_groups": 16,
        "attention_head_dim": 32,
        "layers_per_block": 1,
        "batch_size": 32,
        "lr": 1e-3,
        "steps": 6000,
        "prediction": "v_prediction",
        "snr_gamma": 5.0,
    },
    "gpu": {"steps": _UNET_STEPS},
    "paper": {"batch_size": 48, "prediction": "epsilon", "snr_gamma": 0.0, "steps": _UNET_STEPS},
}
_WIDTHS = ("image_block_out_channels", "mask_block_out_channels")


def default_preset(devices: Devices) -> TrainPreset:
    """The recipe that suits the device in use: CUDA -> gpu, the CPU -> cpu."""
    return "gpu" if devices.kind == "cuda" else "cpu"


def train_values(
    presets: dict[TrainPreset, dict[str, Any]],
    preset: TrainPreset | None,
    devices: Devices,
    recorded: dict[str, Any] | None,
    explicit: dict[str, Any],
) -> dict[str, Any]:
    """A training config's values: the preset's, then a resumed run's recorded ones, then the
    options given. A resume without --preset keeps the run's own recipe (runs older than
    presets trained with the gpu one), never the device's default."""
    given = {key: value for key, value in explicit.items() if value is not None}
    if recorded is not None:
        name = preset or recorded.get("preset") or "gpu"
        base = {**presets[name], **recorded} if preset is None else {**recorded, **presets[name]}
    else:
        name = preset or default_preset(devices)
        base = dict(presets[name])
    values = {**base, **given, "preset": name}
    downsample = int(values.get("downsample", 4))
    # A preset's widths are for f = 4: one level less for f = 2, one more for f = 8 (LDM kl-f8).
    for key in _WIDTHS:
        if key in values and key not in given and values[key]:
            values[key] = _levels(tuple(values[key]), downsample)
    return values


def _levels(widths: tuple[int, ...], downsample: int) -> tuple[int, ...]:
    levels = downsample.bit_length()  # f = 2 ** (levels - 1)
    return (widths + widths[-1:] * levels)[:levels]


def preset_help(presets: dict[TrainPreset, dict[str, Any]]) -> str:
    """Each preset's widths and steps, for `--help`."""

    def widths(values: dict[str, Any]) -> str:
        shown = [values[k] for k in (*_WIDTHS, "block_out_channels") if k in values]
        return (
            "widths " + " / ".join(",".join(map(str, w)) for w in shown)
            if shown
            else "widths by latent size"
        )

    parts = [f"{name}: {widths(v)}, {v['steps']} steps" for name, v in presets.items()]
    return "; ".join(parts)
