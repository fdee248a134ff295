"""Losses of the two-stream VAE: L1 + SAD for images (paper Eq. 1), cross-entropy for masks, KL."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F  # noqa: N812 (the usual torch alias)
from torch import Tensor

from specdm_cli.manifest import IGNORE_INDEX

# Paper Eq. 1 / Sec. 3.4: "The SAD tradeoff in Eq. (1) is set to 0.1".
SAD_WEIGHT = 0.1
# LDM's KL-autoencoder configs (kl-f4 and kl-f8 alike): lossconfig.kl_weight = 1e-6. The paper
# gives no value. Note LDM sums its reconstruction loss over pixels where we average it, so for
# the same ratio of KL to reconstruction as LDM one would divide this by C*H*W.
KL_WEIGHT = 1e-6


class Posterior(Protocol):
    """What we use of diffusers' `DiagonalGaussianDistribution` (a diagonal Gaussian latent)."""

    mean: Tensor
    logvar: Tensor
    deterministic: bool

    def sample(self, generator: torch.Generator | None = None) -> Tensor: ...

    def mode(self) -> Tensor: ...

    def kl(self) -> Tensor: ...


def denormalize(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Undo band normalisation: (B, C, H, W) normalised values -> physical units.

    Args:
        x: band-normalised images, (x_phys - mean) / std.
        mean: per-band mean, shape (C,).
        std: per-band standard deviation, shape (C,).
    """
    shape = (1, -1, 1, 1)
    return x * std.to(x).view(shape) + mean.to(x).view(shape)


def _safe_norm(x: Tensor, floor: float) -> Tensor:
    """L2 norm along dim 1 whose gradient stays finite (zero) where the norm is below `floor`."""
    return x.square().sum(dim=1).clamp_min(floor * floor).sqrt()


def spectral_angle(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-pixel spectral angle in radians between spectra along dim 1 of (B, C, H, W) tensors.

    Uses Kahan's form 2 * atan2(|a/|a| - b/|b||, |a/|a| + b/|b||) rather than acos of the cosine:
    it is exact for parallel spectra (acos with the cosine clamped to 1 - 1e-7 floors at 4.5e-4
    rad) and its gradient stays bounded near 0 and pi. A spectrum whose norm is at most `eps`
    counts as zero: two zero spectra make angle 0, a zero and a non-zero one make pi/2. Norms are
    floored so no gradient is NaN or infinite. Computed in at least float32.

    Returns:
        (B, H, W) angles in [0, pi].
    """
    dtype = torch.promote_types(pred.dtype, torch.float32)
    a, b = pred.to(dtype), target.to(dtype)
    norm_a, norm_b = _safe_norm(a, eps), _safe_norm(b, eps)
    zero_a, zero_b = norm_a <= eps, norm_b <= eps
    unit_a = torch.where(zero_a.unsqueeze(1), 0.0, a / norm_a.unsqueeze(1))
    unit_b = torch.where(zero_b.unsqueeze(1), 0.0, b / norm_b.unsqueeze(1))
    tiny = math.sqrt(torch.finfo(dtype).tiny)
    angle = 2.0 * torch.atan2(_safe_norm(unit_a - unit_b, tiny), _safe_norm(unit_a + unit_b, tiny))
    return torch.where(zero_a & zero_b, 0.0, angle)


def _valid_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    """Mean of (B, H, W) `values` over `valid` pixels (all pixels if None); 0 if none is valid."""
    if valid is None:
        return values.mean()
    weight = valid.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def sad_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean spectral angle distance (radians) over valid pixels, paper Eq. 1.

    Pass spectra in physical units (see `denormalize`): that is where the angle means what the
    paper means, since band normalisation changes the angle.

    Args:
        pred: (B, C, H, W) reconstructed spectra.
        target: (B, C, H, W) true spectra.
        valid: (B, H, W) bool, pixels to count; None counts all.
    """
    return _valid_mean(spectral_angle(pred, target), valid)


def masked_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error over valid pixels and all channels; 0 if no pixel is valid.

    Args:
        pred: (B, C, H, W).
        target: (B, C, H, W).
        valid: (B, H, W) bool; None counts all pixels.
    """
    return _valid_mean((pred - target).abs().mean(dim=1), valid)


def gradient_l1(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error of the images' spatial differences (each pixel minus its right and
    its lower neighbour, every channel), over neighbour pairs whose two pixels are valid.

    L1 on the pixels lets a small decoder draw an edge as a ramp at little cost; the
    differences put the cost where the detail is (edges, thin roads, texture).

    Args:
        pred: (B, C, H, W).
        target: (B, C, H, W).
        valid: (B, H, W) bool; None counts all pixels.
    """
    total = pred.new_zeros(())
    for axis in (-1, -2):
        if pred.shape[axis] < 2:  # a one-pixel-wide image has no neighbours along this axis
            continue
        error = (torch.diff(pred, dim=axis) - torch.diff(target, dim=axis)).abs().mean(dim=1)
        pairs = None
        if valid is not None:
            length = valid.shape[axis] - 1
            pairs = valid.narrow(axis, 0, length) & valid.narrow(axis, 1, length)
        total = total + _valid_mean(error, pairs)
    return total


def image_reconstruction(
    terms: dict[str, Tensor], sad_weight: float, gradient_weight: float = 0.0
) -> Tensor:
    """The image loss without its KL term: L1 + sad_weight * SAD, plus gradient_weight * the
    differences' L1 when that weight is not 0 (`terms` then holds "gradient"). The critics'
    adaptive weight compares their gradient with this one's."""
    loss = terms["l1"] + sad_weight * terms["sad"]
    if gradient_weight:
        loss = loss + gradient_weight * terms["gradient"]
    return loss


def kl_loss(posterior: Posterior) -> Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dims (C, h, w), averaged over the batch (LDM).

    diffusers' `DiagonalGaussianDistribution.kl()` returns the per-sample sum
    0.5 * sum(mu^2 + var - 1 - logvar) over dims 1-3, shape (B,), with logvar clamped to
    [-30, 20]; LDM's loss then takes sum / batch size, i.e. this mean. A deterministic
    posterior has KL 0.
    """
    if posterior.deterministic:
        return posterior.mean.new_zeros(())
    return posterior.kl().mean()


def class_weights_auto(pixel_fraction: Sequence[float]) -> Tensor:
    """Class weights from pixel frequencies: 1 / sqrt(frequency), mean 1 over present classes.

    A class with frequency 0 (absent from the statistics) gets the largest weight of the present
    classes, not 0: it is the rarest class we know of, and a weight of 0 would silently drop its
    pixels wherever it does occur (e.g. statistics taken on another split).

    Args:
        pixel_fraction: per-class fraction of labelled pixels, index = class; need not sum to 1.

    Returns:
        float32 tensor of shape (K,).

    Raises:
        ValueError: a fraction is negative or not finite, or every fraction is 0.
    """
    freq = torch.tensor([float(f) for f in pixel_fraction], dtype=torch.float64)
    if freq.numel() == 0 or not bool(torch.isfinite(freq).all()) or bool((freq < 0).any()):
        raise ValueError(f"class pixel fractions must be finite and >= 0, got {list(freq)}")
    present = freq > 0
    if not bool(present.any()):
        raise ValueError("every class pixel fraction is 0: no class to weight")
    weights = torch.zeros_like(freq)
    weights[present] = freq[present].rsqrt()
    weights[present] /= weights[present].mean()
    weights[~present] = weights[present].max()
    return weights.to(torch.float32)


def mask_ce(logits: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of (B, K, H, W) logits against (B, H, W) labels, ignoring label 255.

    Same value as `F.cross_entropy(logits, target, weight=weights, ignore_index=255)` (the
    weighted mean sum(w_y * nll) / sum(w_y)) but 0 rather than NaN when every pixel is ignored,
    with no host synchronisation.
    """
    target = target.long()
    valid = target != IGNORE_INDEX
    safe = torch.where(valid, target, torch.zeros_like(target))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, safe, reduction="none")
    weight = valid.to(nll.dtype)
    if weights is not None:
        weight = weight * weights.to(nll)[safe]
    return (nll * weight).sum() / weight.sum().clamp_min(torch.finfo(nll.dtype).tiny)


def image_branch_loss(
    recon: Tensor,
    target: Tensor,
    posterior: Posterior,
    mean: Tensor,
    std: Tensor,
    valid: Tensor | None = None,
    sad_weight: float = SAD_WEIGHT,
    kl_weight: float = KL_WEIGHT,
    gradient_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Image-branch loss, paper Eq. 1 plus LDM's KL term: L1 + sad_weight * SAD + kl_weight * KL,
    and gradient_weight * the L1 of the spatial differences (`gradient_l1`) when it is not 0.

    L1 is taken on band-normalised values (every band weighs the same); SAD on de-normalised
    spectra (physical units).

    Args:
        recon: (B, C, H, W) decoded images, band-normalised.
        target: (B, C, H, W) input images, band-normalised.
        posterior: the encoder's latent distribution for `target`.
        mean: per-band mean (C,) used for the normalisation.
        std: per-band std (C,) used for the normalisation.
        valid: (B, H, W) bool pixels to count (e.g. not nodata); None counts all.
        sad_weight: weight of SAD (paper Sec. 3.4: 0.1).
        kl_weight: weight of KL (LDM: 1e-6).
        gradient_weight: weight of `gradient_l1` (0: off, the paper's loss).

    Returns:
        {"l1", "sad", "kl", "total"}, and "gradient" when its weight is not 0: scalar tensors.
    """
    l1 = masked_l1(recon, target, valid)
    sad = sad_loss(denormalize(recon, mean, std), denormalize(target, mean, std), valid)
    kl = kl_loss(posterior)
    losses = {"l1": l1, "sad": sad, "kl": kl}
    if gradient_weight:
        losses["gradient"] = gradient_l1(recon, target, valid)
    losses["total"] = image_reconstruction(losses, sad_weight, gradient_weight) + kl_weight * kl
    return losses


def mask_branch_loss(
    logits: Tensor,
    target: Tensor,
    posterior: Posterior,
    class_weights: Tensor | None = None,
    kl_weight: float = KL_WEIGHT,
) -> dict[str, Tensor]:
    """Mask-branch loss, paper Eq. 2's cross-entropy plus LDM's KL term: CE + kl_weight * KL.

    Args:
        logits: (B, K, H, W) decoded class logits.
        target: (B, H, W) labels 0..K-1, 255 = ignore.
        posterior: the encoder's latent distribution for the one-hot `target`.
        class_weights: (K,) CE weights (see `class_weights_auto`); None = unweighted.
        kl_weight: weight of KL (LDM: 1e-6).

    Returns:
        {"ce", "kl", "total"}: scalar tensors.
    """
    ce = mask_ce(logits, target, class_weights)
    kl = kl_loss(posterior)
    return {"ce": ce, "kl": kl, "total": ce + kl_weight * kl}
