"""The two-stream VAE's shape (its `config.json`): torch-free, so run manifests check it cheaply."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specdm_cli.manifest import IGNORE_INDEX, IMAGE_ARRAYS, LABEL_ARRAY, Task

# Block widths used when none are given, by downsampling factor. LDM's kl-f4 has ch=128,
# ch_mult=(1, 2, 4) and kl-f8 ch_mult=(1, 2, 4, 4); we keep the multipliers at half LDM's base
# width for the image branch and a quarter for the mask branch (a one-hot mask carries far less
# information than a 10-13 band image). Our choice, not measured.
DEFAULT_IMAGE_BLOCKS = {2: (64, 128), 4: (64, 128, 256), 8: (64, 128, 256, 256)}
DEFAULT_MASK_BLOCKS = {2: (32, 64), 4: (32, 64, 128), 8: (32, 64, 128, 128)}


class VAEConfig(BaseModel):
    """Shape of the two-stream (or single-stream baseline) VAE; stored beside its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Spectral bands per image (SegMunich 10, OSCD 13): from the prepared store.
    bands: int = Field(ge=1)
    # Label classes K (SegMunich 13, change detection 2): from the prepared store.
    num_classes: int = Field(ge=2, le=IGNORE_INDEX)
    # "ss": image + mask; "cd": two phases + change map through the same image branch (Sec. 3.3).
    task: Task = "ss"
    # False: the paper's two-stream VAE (Sec. 3.1). True: one VAE over all channels concatenated,
    # the LDM baseline the paper compares with (Sec. 4.2-4.4).
    single_stream: bool = False
    # Spatial downsampling f. Blank in our copy of the paper (Sec. 3.1 cites LDM [43]); 4 = LDM
    # kl-f4 and DESIGN.md (128 px -> 32 px latents). 2 keeps four times the latent pixels
    # (issue 20 §2: the round trip through the VAE is the ceiling of the synthetic data).
    downsample: Literal[2, 4, 8] = 4
    # Image latent channels. LDM kl-f4 has z_channels=3 for 3-band RGB; a 10-13 band image holds
    # more, so we take 4 (LDM kl-f8 / Stable Diffusion). Our choice.
    image_latent_channels: int = Field(4, ge=1)
    # Mask latent channels: 3 = LDM kl-f4's z_channels; a piecewise-constant one-hot mask
    # compresses well. Our choice, not in the paper.
    mask_latent_channels: int = Field(3, ge=1)
    # Single-stream latent channels; None = the two-stream joint latent's total, so the baseline's
    # diffusion model sees a latent of the same size.
    joint_latent_channels: int | None = Field(None, ge=1)
    # Image branch widths, one per level (f = 2**(levels-1)); empty = DEFAULT_IMAGE_BLOCKS[f].
    # The single-stream VAE uses these too.
    image_block_out_channels: tuple[int, ...] = ()
    # Mask branch widths, one per level; empty = DEFAULT_MASK_BLOCKS[f].
    mask_block_out_channels: tuple[int, ...] = ()
    # Residual blocks per level: LDM kl-f4's num_res_blocks=2.
    layers_per_block: int = Field(2, ge=1)
    # GroupNorm groups: LDM's Normalize (32 groups) and diffusers' default; must divide widths.
    norm_num_groups: int = Field(32, ge=1)
    # Ours (issue 20 §2-3), not the paper's: the image decoder also reads the label latent, so
    # decoded images follow the mask's boundaries and classes. False = the paper's decoder.
    mask_aware_decoder: bool = False
    # Ours, for sparse labels: "unlabelled" (255) is one more mask channel, learned like a class,
    # so decoded masks leave 255 where real labels would be absent rather than guess a class
    # there. False = the paper's mask branch: 255 is an all-zero one-hot and ignored by the CE.
    unlabelled_class: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_blocks(cls, data: Any) -> Any:
        if isinstance(data, dict):
            f = data.get("downsample", 4)
            data = dict(data)
            if not data.get("image_block_out_channels"):
                data["image_block_out_channels"] = DEFAULT_IMAGE_BLOCKS.get(f, ())
            if not data.get("mask_block_out_channels"):
                data["mask_block_out_channels"] = DEFAULT_MASK_BLOCKS.get(f, ())
        return data

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        for name in ("image_block_out_channels", "mask_block_out_channels"):
            blocks: tuple[int, ...] = getattr(self, name)
            if not blocks or 2 ** (len(blocks) - 1) != self.downsample:
                raise ValueError(
                    f"{name}={blocks} gives f={2 ** (len(blocks) - 1)} but downsample="
                    f"{self.downsample}: give log2(f)+1 widths"
                )
            if any(c < 1 or c % self.norm_num_groups for c in blocks):
                raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide {name}")
        if self.joint_latent_channels is not None and not self.single_stream:
            raise ValueError("joint_latent_channels applies only with single_stream=True")
        if self.mask_aware_decoder and self.single_stream:
            raise ValueError("mask_aware_decoder needs the two-stream VAE (no label latent)")
        return self

    @property
    def image_names(self) -> tuple[str, ...]:
        """Image array names of the task: ("image",) or ("image_t1", "image_t2")."""
        return IMAGE_ARRAYS[self.task]

    @property
    def label_name(self) -> str:
        """Label array name of the task: "mask" or "change"."""
        return LABEL_ARRAY[self.task]

    @property
    def mask_channels(self) -> int:
        """Channels of the one-hot mask and its logits: the classes, and "unlabelled" if learned."""
        return self.num_classes + int(self.unlabelled_class)

    @property
    def latent_channels(self) -> int:
        """Channels of the joint latent the diffusion model sees."""
        if self.joint_latent_channels is not None:
            return self.joint_latent_channels
        return len(self.image_names) * self.image_latent_channels + self.mask_latent_channels
