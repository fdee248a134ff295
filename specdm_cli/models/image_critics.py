"""Extra image-branch terms of the VAE (issue 20 §2): a frozen segmenter's cross-entropy on the
decoded image and LDM's patch-GAN discriminator with its adaptive weight. Maths only, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from specdm_cli.models.losses import mask_ce

# What an image critic sees: the decoded images (P*B, C, H, W) (P phases stacked on the batch
# axis, band-normalised), the input images alike, the labels (B, H, W) and the reconstruction
# loss so far (for LDM's adaptive weight); it returns named scalar terms, "total" being the
# amount added to the image branch's loss.
ImageCritic = Callable[[Tensor, Tensor, Tensor, Tensor], dict[str, Tensor]]


def semantic_loss(
    segmenter: nn.Module, recon: Tensor, labels: Tensor, phases: int, weights: Tensor | None
) -> Tensor:
    """Cross-entropy of a frozen segmenter (the metrics' compact U-Net, or the siamese change
    detector for cd) applied to the decoded images, against the true labels.

    L1 and SAD weigh every spectral difference by its size alone; the small ones that separate
    crop, grass and soil cost them little. A segmenter trained on real images is sensitive to
    exactly those, so its cross-entropy on the reconstruction pulls the decoder towards what a
    downstream segmenter needs. The segmenter's weights are frozen (eval mode): only the VAE
    learns from this term.
    """
    _features, logits = segmenter(list(recon.chunk(phases, dim=0)))
    return mask_ce(logits, labels, weights)


class DiscriminatorConfig(BaseModel):
    """Shape of the patch-GAN discriminator; stored beside its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bands: int = Field(ge=1)  # input channels: any band count
    # LDM's NLayerDiscriminator (taming-transformers) has ndf=64 and n_layers=3 for 256 px RGB;
    # our demo scenes are 64 px with small VAEs, so a quarter of the width (ours, not measured).
    width: int = Field(16, ge=1)
    layers: int = Field(3, ge=1, le=5)


def patch_layers(size: int, wanted: int = 3) -> int:
    """The most strided levels, up to `wanted`, a discriminator can run on `size` px scenes:
    with L levels its last 4x4 convolutions see size / 2**L pixels, which must be at least 3
    (LDM's 3 levels need 24 px). 0: too small for any."""
    return max((levels for levels in range(1, wanted + 1) if size >> levels >= 3), default=0)


class PatchDiscriminator(nn.Module):
    """pix2pix / LDM's PatchGAN: strided 4x4 convolutions, one real/fake logit per patch.

    Built as taming-transformers' NLayerDiscriminator (LDM's loss `LPIPSWithDiscriminator`):
    conv-LeakyReLU, then `layers - 1` strided conv-norm-LeakyReLU with doubling width (capped at
    8x), one stride-1 conv-norm-LeakyReLU and a 1-channel stride-1 conv. GroupNorm instead of its
    BatchNorm: per-sample statistics make the score of a sample independent of its batch, so a
    rank's share of the batch is scored as the whole batch would be.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        width = config.width
        layers: list[nn.Module] = [
            nn.Conv2d(config.bands, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
        ]
        previous = width
        for level in range(1, config.layers + 1):
            current = width * min(2**level, 8)
            stride = 2 if level < config.layers else 1
            layers += [
                nn.Conv2d(previous, current, 4, stride, 1, bias=False),
                nn.GroupNorm(min(8, current), current),
                nn.LeakyReLU(0.2),
            ]
            previous = current
        layers.append(nn.Conv2d(previous, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) band-normalised images -> (B, 1, h, w) patch logits."""
        logits: Tensor = self.layers(images)
        return logits


def _init_weights(module: nn.Module) -> None:
    """taming-transformers' weights_init: N(0, 0.02) convolutions, N(1, 0.02) norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """LDM's hinge loss of the discriminator: mean(relu(1 - real)) + mean(relu(1 + fake)), / 2."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(nll: Tensor, generator_loss: Tensor, last_layer: Tensor) -> Tensor:
    """LDM's adaptive weight (Esser et al., taming-transformers `calculate_adaptive_weight`):
    |grad nll| / (|grad g_loss| + 1e-4) at the decoder's last layer, clamped to [0, 1e4] and
    detached, so the adversarial gradient reaching the decoder is as large as the
    reconstruction's whatever the scale of either loss."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight: Tensor = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()
