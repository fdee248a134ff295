"""The two-stream KL-VAE of SpecDM (paper Sec. 3.1): image and mask branches, joint latent layout."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.models.image_critics import ImageCritic
from specdm_cli.models.losses import (
    KL_WEIGHT,
    SAD_WEIGHT,
    Posterior,
    denormalize,
    gradient_l1,
    image_branch_loss,
    image_reconstruction,
    kl_loss,
    mask_branch_loss,
    mask_ce,
    masked_l1,
    sad_loss,
)
from specdm_cli.models.vae_config import VAEConfig


def build_autoencoder(
    in_channels: int,
    out_channels: int,
    latent_channels: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    norm_num_groups: int,
) -> Any:
    """A diffusers `AutoencoderKL` (LDM's KL-VAE, Sec. 3.4) with f = 2**(len(blocks)-1).

    `scaling_factor` is 1.0: the latent scale is estimated per stream after training.
    """
    levels = len(block_out_channels)
    autoencoder: Any = AutoencoderKL  # diffusers' __init__ is untyped
    return autoencoder(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        scaling_factor=1.0,
        force_upcast=False,
    )


def one_hot_mask(mask: Tensor, num_classes: int, unlabelled_class: bool = False) -> Tensor:
    """(B, H, W) labels -> (B, K, H, W) float one-hot (Sec. 3.4); label 255 -> all zeros, or
    with `unlabelled_class` -> channel K of K + 1.

    Raises:
        RuntimeError: a label is neither in 0..K-1 nor 255 (from `F.one_hot`).
    """
    mask = mask.long()
    if unlabelled_class:
        mask = unlabelled_as_class(mask, num_classes)
        return F.one_hot(mask, num_classes + 1).permute(0, 3, 1, 2).float()
    valid = mask != IGNORE_INDEX
    hot = F.one_hot(torch.where(valid, mask, torch.zeros_like(mask)), num_classes)
    hot = hot * valid.unsqueeze(-1)
    return hot.permute(0, 3, 1, 2).float()


def unlabelled_as_class(mask: Tensor, num_classes: int) -> Tensor:
    """Labels with 255 as class K (the unlabelled channel's index)."""
    return torch.where(mask == IGNORE_INDEX, torch.full_like(mask, num_classes), mask)


def _split_posterior(posterior: Posterior, parts: int) -> list[Posterior]:
    """Split a posterior over a batch stacked from `parts` equal groups into one per group."""
    params = cast(Tensor, cast(Any, posterior).parameters)
    return [DiagonalGaussianDistribution(p) for p in params.chunk(parts, dim=0)]


def _sample(vae: Any, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Posterior]:
    """Encode, sample the posterior, decode: (reconstruction, posterior)."""
    posterior = cast(Posterior, vae.encode(x).latent_dist)
    recon = cast(Tensor, vae.decode(posterior.sample(generator)).sample)
    return recon, posterior


class SpecDMVAE(nn.Module):
    """Image and mask KL-VAEs with separate parameters (two-stream, Sec. 3.1), or one joint VAE.

    Batches are dicts keyed by array name: images band-normalised (B, C, H, W) float, labels
    (B, H, W) integer with 255 = ignore. For cd the one image VAE encodes both phases (shared
    weights, Sec. 3.3). The single-stream baseline encodes concat(images..., one-hot labels) on
    the channel axis and decodes the same channels (images, then class logits).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.image_vae: Any = None
        self.mask_vae: Any = None
        self.joint_vae: Any = None
        common = {"layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups}
        if c.single_stream:
            channels = len(c.image_names) * c.bands + c.mask_channels
            self.joint_vae = build_autoencoder(
                channels, channels, c.latent_channels, c.image_block_out_channels, **common
            )
        else:
            self.image_vae = build_autoencoder(
                c.bands, c.bands, c.image_latent_channels, c.image_block_out_channels, **common
            )
            self.mask_vae = build_autoencoder(
                c.mask_channels,
                c.mask_channels,
                c.mask_latent_channels,
                c.mask_block_out_channels,
                **common,
            )
        self.label_to_image: nn.Conv2d | None = None
        if c.mask_aware_decoder:
            # diffusers sizes the decoder's first conv to its own latent. A parallel conv on the
            # label latent, added to that conv's output, is a first conv over [image latent,
            # label latent] and leaves the image branch a plain diffusers folder. Zero at the
            # start: training begins from the paper's decoder.
            width = c.image_block_out_channels[-1]
            conv = nn.Conv2d(c.mask_latent_channels, width, 3, padding=1)
            with torch.no_grad():
                for parameter in conv.parameters():
                    parameter.zero_()
            self.label_to_image = conv

    def latent_layout(self) -> list[tuple[str, int]]:
        """Channel blocks of the joint latent, in order: [(stream name, channels), ...].

        ss: [("image", c_img), ("mask", c_mask)]; cd: [("image_t1", c_img), ("image_t2", c_img),
        ("change", c_mask)]; single-stream (ss and cd): [("joint", c)].
        """
        c = self.config
        if c.single_stream:
            return [("joint", c.latent_channels)]
        images = [(name, c.image_latent_channels) for name in c.image_names]
        return [*images, (c.label_name, c.mask_latent_channels)]

    def split_latent(self, z: Tensor) -> dict[str, Tensor]:
        """(B, sum c, h, w) joint latent -> {stream name: (B, c, h, w)} following the layout."""
        names, sizes = zip(*self.latent_layout(), strict=True)
        if z.shape[1] != sum(sizes):
            raise ValueError(f"latent has {z.shape[1]} channels, layout wants {sum(sizes)}")
        return dict(zip(names, torch.split(z, list(sizes), dim=1), strict=True))

    def join_latent(self, parts: dict[str, Tensor]) -> Tensor:
        """{stream name: latent} -> joint latent concatenated on channels in layout order."""
        names = [name for name, _ in self.latent_layout()]
        if sorted(parts) != sorted(names):
            raise ValueError(f"latent parts {sorted(parts)} do not match the layout {names}")
        return torch.cat([parts[name] for name in names], dim=1)

    def _joint_input(self, batch: dict[str, Tensor]) -> Tensor:
        """Single-stream input: images then the one-hot label on the channel axis."""
        c = self.config
        hot = self.one_hot(batch[c.label_name])
        images = [batch[name] for name in c.image_names]
        return torch.cat([*images, hot.to(images[0])], dim=1)

    def encode(self, batch: dict[str, Tensor]) -> dict[str, Posterior]:
        """Latent distributions keyed by stream name (the names of `latent_layout`)."""
        c = self.config
        if c.single_stream:
            return {"joint": self.joint_vae.encode(self._joint_input(batch)).latent_dist}
        images = torch.cat([batch[name] for name in c.image_names], dim=0)
        image_post = cast(Posterior, self.image_vae.encode(images).latent_dist)
        posts = dict(
            zip(c.image_names, _split_posterior(image_post, len(c.image_names)), strict=True)
        )
        hot = self.one_hot(batch[c.label_name]).to(images)
        posts[c.label_name] = self.mask_vae.encode(hot).latent_dist
        return posts

    def encode_latent(
        self,
        batch: dict[str, Tensor],
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Joint latent of a batch: posterior modes (means), or samples if `sample`."""
        posts = self.encode(batch)
        parts = {k: p.sample(generator) if sample else p.mode() for k, p in posts.items()}
        return self.join_latent(parts)

    def decode_images(self, z: Tensor, label: Tensor | None = None) -> Tensor:
        """Image-branch latents (B, c_img, h, w) -> band-normalised images (B, C, H, W).

        `label`: the label latents (B / phases, c_mask, h, w) the mask-aware decoder reads, one
        per pair (cd: both phases of a pair read its change latent); unused otherwise.
        """
        if self.image_vae is None:
            raise RuntimeError("decode_images needs the two-stream VAE; use decode_joint")
        if self.label_to_image is None:
            return cast(Tensor, self.image_vae.decode(z).sample)
        if label is None:
            raise ValueError("the mask-aware image decoder needs the label latent")
        extra = self.label_to_image(label).repeat(z.shape[0] // label.shape[0], 1, 1, 1)
        conv_in = self.image_vae.decoder.conv_in
        hook = conv_in.register_forward_hook(lambda _module, _args, out: out + extra)
        try:
            return cast(Tensor, self.image_vae.decode(z).sample)
        finally:
            hook.remove()

    def one_hot(self, labels: Tensor) -> Tensor:
        """The mask branch's input for (B, H, W) labels (255 = unlabelled)."""
        c = self.config
        return one_hot_mask(labels, c.num_classes, c.unlabelled_class)

    def ce_target(self, labels: Tensor) -> Tensor:
        """Cross-entropy targets: 255 ignored, or the unlabelled channel when it is learned."""
        labels = labels.long()
        c = self.config
        return unlabelled_as_class(labels, c.num_classes) if c.unlabelled_class else labels

    def ce_weights(self, class_weights: Tensor | None) -> Tensor | None:
        """Per-class CE weights, weight 1 for the unlabelled channel when it is learned."""
        if class_weights is None or not self.config.unlabelled_class:
            return class_weights
        return torch.cat([class_weights, class_weights.new_ones(1)])

    def labels(self, logits: Tensor) -> Tensor:
        """Decoded (B, K[+1], H, W) logits -> (B, H, W) int64 labels, 255 where the unlabelled
        channel wins."""
        labels = logits.argmax(dim=1)
        if self.config.unlabelled_class:
            labels = torch.where(labels == self.config.num_classes, IGNORE_INDEX, labels)
        return labels

    def decode_mask_logits(self, z: Tensor) -> Tensor:
        """Mask-branch latents (B, c_mask, h, w) -> class logits (B, K, H, W)."""
        if self.mask_vae is None:
            raise RuntimeError("decode_mask_logits needs the two-stream VAE; use decode_joint")
        return cast(Tensor, self.mask_vae.decode(z).sample)

    def decode_joint(self, z: Tensor) -> dict[str, Tensor]:
        """Joint latent -> {image name: normalised (B, C, H, W), label name: logits (B, K, H, W)}."""
        c = self.config
        parts = self.split_latent(z)
        if c.single_stream:
            out = cast(Tensor, self.joint_vae.decode(parts["joint"]).sample)
            sizes = [c.bands] * len(c.image_names) + [c.mask_channels]
            names = [*c.image_names, c.label_name]
            return dict(zip(names, torch.split(out, sizes, dim=1), strict=True))
        label = parts[c.label_name]
        images = self.decode_images(torch.cat([parts[n] for n in c.image_names], dim=0), label)
        decoded = dict(zip(c.image_names, images.chunk(len(c.image_names), dim=0), strict=True))
        decoded[c.label_name] = self.decode_mask_logits(label)
        return decoded

    def forward_losses(
        self,
        batch: dict[str, Tensor],
        mean: Tensor,
        std: Tensor,
        sad_weight: float = SAD_WEIGHT,
        kl_weight: float = KL_WEIGHT,
        class_weights: Tensor | None = None,
        valid: Tensor | None = None,
        generator: torch.Generator | None = None,
        critic: ImageCritic | None = None,
        gradient_weight: float = 0.0,
    ) -> dict[str, Tensor]:
        """Encode, sample, decode and score a batch (paper Eq. 1-2, plus LDM's KL terms).

        Args:
            batch: band-normalised images and integer labels keyed by array name.
            mean: per-band mean (C,) of the normalisation, for SAD in physical units.
            std: per-band std (C,) of the normalisation.
            sad_weight: SAD weight in Eq. 1 (paper Sec. 3.4: 0.1).
            kl_weight: KL weight (LDM: 1e-6).
            class_weights: (K,) cross-entropy weights; None = unweighted (the paper).
            valid: (B, H, W) bool image pixels to score (e.g. not nodata); None = all. For cd it
                applies to both phases.
            generator: RNG for the posterior samples.
            critic: extra terms on the decoded images (see `models.image_critics`); its named
                terms join the image terms and its "total" is added to the image loss.
            gradient_weight: weight of the L1 of the images' spatial differences (0: off).

        Returns:
            Scalar tensors: two-stream "image/{l1,sad,kl,total}", "mask/{ce,kl,total}"
            (cd: image terms averaged over both phases; "mask/" is the change map), or
            single-stream "joint/{l1,sad,ce,kl,total}"; any critic terms beside them; and
            "total", the sum to minimise.
        """
        if self.config.single_stream:
            weights = (sad_weight, kl_weight, gradient_weight)
            losses = self._joint_losses(
                batch, mean, std, weights, class_weights, valid, generator, critic
            )
            return {**{f"joint/{k}": v for k, v in losses.items()}, "total": losses["total"]}
        c = self.config
        images = torch.cat([batch[name] for name in c.image_names], dim=0)
        valid_all = None if valid is None else valid.repeat(len(c.image_names), 1, 1)
        target = batch[c.label_name].long()
        post = cast(Posterior, self.image_vae.encode(images).latent_dist)
        z_image = post.sample(generator)
        mask_post = cast(
            Posterior,
            self.mask_vae.encode(self.one_hot(target).to(images)).latent_dist,
        )
        z_label = mask_post.sample(generator)
        # The image loss does not train the mask encoder: the label latent stays a code of the
        # mask alone (the paper's mask branch), which the mask-aware decoder only reads.
        recon = self.decode_images(z_image, z_label.detach())
        image = image_branch_loss(
            recon, images, post, mean, std, valid_all, sad_weight, kl_weight, gradient_weight
        )
        if critic is not None:
            reconstruction = image_reconstruction(image, sad_weight, gradient_weight)
            image = _with_critic(image, critic(recon, images, target, reconstruction))
        logits = self.decode_mask_logits(z_label)
        mask = mask_branch_loss(
            logits, self.ce_target(target), mask_post, self.ce_weights(class_weights), kl_weight
        )
        return {
            **{f"image/{k}": v for k, v in image.items()},
            **{f"mask/{k}": v for k, v in mask.items()},
            "total": image["total"] + mask["total"],
        }

    def _joint_losses(
        self,
        batch: dict[str, Tensor],
        mean: Tensor,
        std: Tensor,
        weights: tuple[float, float, float],
        class_weights: Tensor | None,
        valid: Tensor | None,
        generator: torch.Generator | None,
        critic: ImageCritic | None = None,
    ) -> dict[str, Tensor]:
        """Single-stream baseline: L1 + SAD (+ the differences' L1) on the image channels, CE on
        the class channels; `weights` = (SAD, KL, gradient) weights."""
        sad_weight, kl_weight, gradient_weight = weights
        c = self.config
        n_img = len(c.image_names)
        recon, post = _sample(self.joint_vae, self._joint_input(batch), generator)
        rec_img = torch.cat(recon[:, : n_img * c.bands].chunk(n_img, dim=1), dim=0)
        images = torch.cat([batch[name] for name in c.image_names], dim=0)
        valid_all = None if valid is None else valid.repeat(n_img, 1, 1)
        l1 = masked_l1(rec_img, images, valid_all)
        sad = sad_loss(denormalize(rec_img, mean, std), denormalize(images, mean, std), valid_all)
        ce = mask_ce(
            recon[:, n_img * c.bands :],
            self.ce_target(batch[c.label_name]),
            self.ce_weights(class_weights),
        )
        kl = kl_loss(post)
        losses = {"l1": l1, "sad": sad, "ce": ce, "kl": kl}
        if gradient_weight:
            losses["gradient"] = gradient_l1(rec_img, images, valid_all)
        reconstruction = image_reconstruction(losses, sad_weight, gradient_weight)
        losses["total"] = reconstruction + ce + kl_weight * kl
        if critic is None:
            return losses
        return _with_critic(
            losses, critic(rec_img, images, batch[c.label_name].long(), reconstruction)
        )


def _with_critic(losses: dict[str, Tensor], extra: dict[str, Tensor]) -> dict[str, Tensor]:
    """A branch's loss terms with a critic's named terms beside them, its total added."""
    terms = {name: value for name, value in extra.items() if name != "total"}
    return {**losses, **terms, "total": losses["total"] + extra["total"]}
