"""Two-stream VAE and its losses: golden values for the maths, invariants for the networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError
from torch import Tensor

from specdm_cli.manifest import IGNORE_INDEX
from specdm_cli.models.losses import (
    class_weights_auto,
    denormalize,
    gradient_l1,
    image_branch_loss,
    kl_loss,
    mask_ce,
    masked_l1,
    sad_loss,
    spectral_angle,
)
from specdm_cli.models.vae import SpecDMVAE, one_hot_mask
from specdm_cli.models.vae_config import VAEConfig

BANDS, SIZE = 5, 16
# Three levels (f=4) of 8-16 channels: a few milliseconds per step on CPU.
TINY = {
    "image_block_out_channels": (8, 16, 16),
    "mask_block_out_channels": (8, 8, 16),
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def tiny_config(task: str = "ss", single_stream: bool = False, classes: int = 4) -> VAEConfig:
    """A tiny f=4 VAE for 5 bands and `classes` classes."""
    return VAEConfig.model_validate(
        {"bands": BANDS, "num_classes": classes, "task": task, "single_stream": single_stream}
        | TINY
    )


def make_batch(config: VAEConfig, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Random normalised images and labels with a few ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(batch, BANDS, SIZE, SIZE, generator=gen) for n in config.image_names}
    labels = torch.randint(0, config.num_classes, (batch, SIZE, SIZE), generator=gen)
    labels[:, :2, :2] = IGNORE_INDEX
    out[config.label_name] = labels.to(torch.uint8)
    return out


STATS = (torch.linspace(100.0, 900.0, BANDS), torch.linspace(10.0, 50.0, BANDS))


def as_image(spectra: list[list[float]]) -> Tensor:
    """Spectra (pixels x bands) as a (1, C, 1, P) float64 image."""
    return torch.tensor(spectra, dtype=torch.float64).T[None, :, None, :]


# --- losses: golden values -------------------------------------------------------------------


def test_spectral_angle_golden_values() -> None:
    pred = as_image([[1, 0, 0], [2, 2, 0], [3, 0, 0], [0, 0, 0], [0, 0, 0], [1, 2, 3], [1, 0, 0]])
    target = as_image(
        [[0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 5, 0], [3, 2, 1], [-1, 0, 0]]
    )
    expected = [math.pi / 2, math.pi / 4, 0.0, 0.0, math.pi / 2, math.acos(10 / 14), math.pi]
    got = spectral_angle(pred, target).flatten().tolist()
    assert got == pytest.approx(expected, abs=1e-12)


def test_spectral_angle_matches_acos_and_is_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 7, 4, 4, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(2, 7, 4, 4, generator=gen, dtype=torch.float64) + 0.1
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(spectral_angle(a, b), torch.acos(cos))
    torch.testing.assert_close(spectral_angle(3.0 * a, 0.5 * b), spectral_angle(a, b))


def test_spectral_angle_gradient_finite_at_zero_and_parallel() -> None:
    pred = as_image([[0, 0, 0], [0, 0, 0], [1, 2, 3], [1, 0, 0]]).float().requires_grad_()
    target = as_image([[0, 0, 0], [1, 1, 1], [2, 4, 6], [-1, 0, 0]]).float()
    sad_loss(pred, target).backward()  # type: ignore[no-untyped-call]
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


def test_sad_is_the_same_through_any_normalisation() -> None:
    gen = torch.Generator().manual_seed(2)
    phys_a = torch.rand(2, BANDS, 4, 4, generator=gen) * 1000 + 50
    phys_b = torch.rand(2, BANDS, 4, 4, generator=gen) * 1000 + 50
    direct = sad_loss(phys_a, phys_b)
    for mean, std in (STATS, (torch.full((BANDS,), -3.0), torch.full((BANDS,), 700.0))):
        shape = (1, -1, 1, 1)
        norm_a, norm_b = ((x - mean.view(shape)) / std.view(shape) for x in (phys_a, phys_b))
        through = sad_loss(denormalize(norm_a, mean, std), denormalize(norm_b, mean, std))
        torch.testing.assert_close(through, direct)


def test_masked_l1_and_sad_ignore_invalid_pixels() -> None:
    target = torch.ones(1, 2, 2, 2)
    pred = target.clone()
    pred[0, :, 0, 0] = torch.tensor([1.0, 3.0])  # |error| 0 and 2 on a valid pixel
    pred[0, :, 1, 1] = torch.tensor([-100.0, 100.0])  # huge error on the invalid pixel
    valid = torch.tensor([[[True, True], [True, False]]])
    assert masked_l1(pred, target, valid).item() == pytest.approx((0 + 2) / 2 / 3)
    assert masked_l1(pred, target, torch.zeros_like(valid)).item() == 0.0
    angle = math.acos(4 / math.sqrt(2 * 10))  # (1, 3) against (1, 1)
    assert sad_loss(pred, target, valid).item() == pytest.approx(angle / 3)


def test_gradient_l1_scores_edges_not_offsets() -> None:
    sharp = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 1, 2, 4)
    ramp = torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0], [0.0, 1 / 3, 2 / 3, 1.0]]).view(1, 1, 2, 4)
    # Across: sharp steps (0, 1, 0), the ramp (1/3, 1/3, 1/3): mean error 4/9; down: none.
    assert gradient_l1(ramp, sharp).item() == pytest.approx(4 / 9)
    assert gradient_l1(sharp + 5.0, sharp).item() == pytest.approx(0.0)  # L1 would be 5
    row = sharp[..., :1, :]  # one row: no vertical neighbours, still the horizontal term
    assert gradient_l1(ramp[..., :1, :], row).item() == pytest.approx(4 / 9)


def test_gradient_l1_skips_pairs_with_an_invalid_pixel() -> None:
    target = torch.zeros(1, 2, 3, 3)
    pred = target.clone()
    pred[0, :, 0, 0] = 1.0  # differs from its right and lower neighbours by 1
    pred[0, :, 1, 1] = 100.0  # a huge error on the invalid pixel, left, right, above and below
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, 1, 1] = False
    # 4 valid pairs per axis (of 6); pixel (0, 0) is in one of them on each: 1/4 + 1/4.
    assert gradient_l1(pred, target, valid).item() == pytest.approx(2 / 4)


def test_image_branch_loss_adds_the_gradient_term_only_when_weighted() -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    generator = torch.Generator().manual_seed(5)
    image, recon = torch.randn(2, 2, BANDS, 4, 4, generator=generator)
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 6, 1, 1))
    plain = image_branch_loss(recon, image, posterior, *STATS)
    weighted = image_branch_loss(recon, image, posterior, *STATS, gradient_weight=2.0)
    assert "gradient" not in plain
    assert weighted["gradient"].item() == pytest.approx(gradient_l1(recon, image).item())
    expected = plain["total"] + 2.0 * weighted["gradient"]
    assert weighted["total"].item() == pytest.approx(expected.item())


def test_image_branch_loss_zero_for_perfect_reconstruction() -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    image = torch.randn(2, BANDS, 4, 4, generator=torch.Generator().manual_seed(4))
    posterior = DiagonalGaussianDistribution(torch.zeros(2, 6, 1, 1))  # N(0, I): KL 0
    losses = image_branch_loss(image, image, posterior, *STATS)
    assert {k: v.item() for k, v in losses.items()} == pytest.approx(
        {"l1": 0.0, "sad": 0.0, "kl": 0.0, "total": 0.0}, abs=1e-6
    )


def test_mask_ce_matches_torch_and_ignores_255() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 5, 5, generator=gen)
    target = torch.randint(0, 4, (2, 5, 5), generator=gen)
    target[0, 0, :] = IGNORE_INDEX
    weights = torch.tensor([0.5, 1.0, 2.0, 1.5])
    for w in (None, weights):
        expected = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(mask_ce(logits, target, w), expected)
    changed = logits.clone()
    changed[0, :, 0, :] = 50.0 * torch.randn(4, 5, generator=gen)  # only ignored pixels
    torch.testing.assert_close(mask_ce(changed, target), mask_ce(logits, target))
    all_ignored = torch.full_like(target, IGNORE_INDEX)
    assert mask_ce(logits, all_ignored).item() == 0.0


def test_class_weights_auto_known_frequencies() -> None:
    weights = class_weights_auto([0.64, 0.16, 0.0, 0.04]).tolist()
    raw = [1 / 0.8, 1 / 0.4, 1 / 0.2]  # 1 / sqrt(f) of the present classes, mean 35/12
    scale = 3 / sum(raw)
    assert weights == pytest.approx(
        [raw[0] * scale, raw[1] * scale, raw[2] * scale, raw[2] * scale]
    )
    with pytest.raises(ValueError):
        class_weights_auto([0.0, 0.0])
    with pytest.raises(ValueError):
        class_weights_auto([0.5, -0.1])


def test_one_hot_ignore_is_all_zero() -> None:
    mask = torch.tensor([[[0, 2], [IGNORE_INDEX, 1]]], dtype=torch.uint8)
    hot = one_hot_mask(mask, 3)
    assert hot.shape == (1, 3, 2, 2) and hot.dtype == torch.float32
    assert hot[0, :, 1, 0].tolist() == [0.0, 0.0, 0.0]
    assert hot[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    assert hot.sum().item() == 3.0


def test_kl_loss_is_ldm_sum_over_dims_mean_over_batch() -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    mean = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    logvar = torch.zeros(2, 3, 2, 2)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert kl_loss(posterior).item() == pytest.approx((0.5 * 12 + 0.0) / 2)


# --- config ------------------------------------------------------------------------------------


def test_config_defaults_follow_downsample_and_validate() -> None:
    f4 = VAEConfig(bands=10, num_classes=13)
    assert (f4.downsample, f4.image_block_out_channels) == (4, (64, 128, 256))
    assert len(VAEConfig(bands=10, num_classes=13, downsample=8).mask_block_out_channels) == 4
    assert len(VAEConfig(bands=10, num_classes=13, downsample=2).image_block_out_channels) == 2
    with pytest.raises(ValidationError, match="downsample"):
        VAEConfig(bands=3, num_classes=2, image_block_out_channels=(8, 16))
    with pytest.raises(ValidationError, match="norm_num_groups"):
        VAEConfig(bands=3, num_classes=2, norm_num_groups=5)
    with pytest.raises(ValidationError, match="single_stream"):
        VAEConfig(bands=3, num_classes=2, joint_latent_channels=6)


# --- networks: shapes and invariants ---------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "single", "layout"),
    [
        ("ss", False, [("image", 4), ("mask", 3)]),
        ("cd", False, [("image_t1", 4), ("image_t2", 4), ("change", 3)]),
        ("ss", True, [("joint", 7)]),
        ("cd", True, [("joint", 11)]),
    ],
)
def test_shapes_and_round_trip(task: str, single: bool, layout: list[tuple[str, int]]) -> None:
    torch.manual_seed(0)
    config = tiny_config(task, single)
    model = SpecDMVAE(config).eval()
    batch = make_batch(config)
    assert model.latent_layout() == layout
    with torch.no_grad():
        z = model.encode_latent(batch)
        assert z.shape == (2, config.latent_channels, SIZE // 4, SIZE // 4)
        assert sum(c for _, c in layout) == config.latent_channels
        torch.testing.assert_close(model.join_latent(model.split_latent(z)), z)
        decoded = model.decode_joint(z)
    assert sorted(decoded) == sorted([*config.image_names, config.label_name])
    for name in config.image_names:
        assert decoded[name].shape == (2, BANDS, SIZE, SIZE)
    assert decoded[config.label_name].shape == (2, config.num_classes, SIZE, SIZE)


def test_cd_shares_one_image_network_across_phases() -> None:
    torch.manual_seed(0)
    config = tiny_config("cd", classes=2)
    model = SpecDMVAE(config).eval()
    autoencoders = [m for m in model.modules() if type(m).__name__ == "AutoencoderKL"]
    assert len(autoencoders) == 2 and model.joint_vae is None
    batch = make_batch(config)
    swapped = {**batch, "image_t1": batch["image_t2"], "image_t2": batch["image_t1"]}
    with torch.no_grad():
        parts, parts_swapped = (
            model.split_latent(model.encode_latent(b)) for b in (batch, swapped)
        )
        alone = model.image_vae.encode(batch["image_t2"]).latent_dist.mode()
    torch.testing.assert_close(parts_swapped["image_t1"], parts["image_t2"])
    torch.testing.assert_close(parts_swapped["image_t2"], parts["image_t1"])
    torch.testing.assert_close(parts_swapped["change"], parts["change"])
    torch.testing.assert_close(parts["image_t2"], alone, atol=1e-5, rtol=1e-5)


def test_two_stream_branches_have_separate_parameters() -> None:
    model = SpecDMVAE(tiny_config())
    image_ids = {id(p) for p in model.image_vae.parameters()}
    assert image_ids.isdisjoint(id(p) for p in model.mask_vae.parameters())
    with pytest.raises(RuntimeError):
        SpecDMVAE(tiny_config(single_stream=True)).decode_images(torch.zeros(1, 4, 4, 4))


def test_split_and_join_reject_wrong_latents() -> None:
    model = SpecDMVAE(tiny_config())
    with pytest.raises(ValueError, match="channels"):
        model.split_latent(torch.zeros(1, 6, 4, 4))
    with pytest.raises(ValueError, match="layout"):
        model.join_latent({"image": torch.zeros(1, 4, 4, 4)})


@pytest.mark.parametrize(("task", "single"), [("ss", False), ("ss", True), ("cd", False)])
def test_training_steps_reduce_the_loss(task: str, single: bool) -> None:
    torch.manual_seed(0)
    config = tiny_config(task, single, classes=4 if task == "ss" else 2)
    model = SpecDMVAE(config)
    batch = make_batch(config)
    valid = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    valid[:, :2, :2] = False

    def loss() -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(0)
        return model.forward_losses(batch, *STATS, valid=valid, generator=gen)

    first = loss()
    expected_keys = (
        {"joint/l1", "joint/sad", "joint/ce", "joint/kl"}
        if single
        else {"image/l1", "image/sad", "image/kl", "mask/ce", "mask/kl"}
    )
    assert expected_keys < set(first) and "total" in first
    assert all(v.ndim == 0 and torch.isfinite(v) for v in first.values())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        optimizer.zero_grad()
        loss()["total"].backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert loss()["total"].item() < 0.95 * first["total"].item()


# --- sparse labels: the unlabelled channel ------------------------------------------------------


def test_unlabelled_class_is_channel_k_and_decodes_to_255() -> None:
    mask = torch.tensor([[[0, 2], [IGNORE_INDEX, 1]]], dtype=torch.uint8)
    hot = one_hot_mask(mask, 3, unlabelled_class=True)
    assert hot.shape == (1, 4, 2, 2)
    assert hot[0, :, 1, 0].tolist() == [0.0, 0.0, 0.0, 1.0] and hot.sum().item() == 4.0
    model = SpecDMVAE(tiny_config(classes=3).model_copy(update={"unlabelled_class": True}))
    assert model.config.mask_channels == 4
    assert model.ce_target(mask.long()).tolist() == [[[0, 2], [3, 1]]]
    weights = model.ce_weights(torch.tensor([0.5, 1.0, 2.0]))
    assert weights is not None and weights.tolist() == [0.5, 1.0, 2.0, 1.0]
    logits = torch.zeros(1, 4, 1, 3)
    logits[0, [3, 1, 0], 0, [0, 1, 2]] = 1.0
    assert model.labels(logits).tolist() == [[[IGNORE_INDEX, 1, 0]]]


@pytest.mark.parametrize("unlabelled", [False, True])
def test_sparse_labels_round_trip_unlabelled_only_with_the_channel(unlabelled: bool) -> None:
    # Labels on the left half only, as sparse reference masks: with the channel, the decoded
    # masks leave the right half unlabelled; without it, every pixel gets a guessed class.
    torch.manual_seed(0)
    config = tiny_config(classes=3).model_copy(update={"unlabelled_class": unlabelled})
    model = SpecDMVAE(config)
    batch = make_batch(config, batch=4)
    batch["mask"][:, :, SIZE // 2 :] = IGNORE_INDEX
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model.forward_losses(batch, *STATS)["total"].backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        decoded = model.labels(model.decode_joint(model.encode_latent(batch))["mask"])
    unlabelled_share = (decoded[:, :, SIZE // 2 :] == IGNORE_INDEX).float().mean().item()
    labelled_share = (decoded[:, :, : SIZE // 2] == IGNORE_INDEX).float().mean().item()
    if unlabelled:
        assert unlabelled_share > 0.9 and labelled_share < 0.2
    else:
        assert unlabelled_share == 0.0


def test_unlabelled_pixels_count_for_the_image_loss_only_with_the_channel() -> None:
    from specdm_cli.pipeline.train.common import image_pixels

    labelled = torch.tensor([[True, False], [False, True]])
    assert image_pixels(labelled, unlabelled_class=False).tolist() == labelled.tolist()
    assert image_pixels(labelled, unlabelled_class=True).all()


def test_validation_counts_a_labelled_pixel_decoded_unlabelled_as_a_miss() -> None:
    from specdm_cli.pipeline.train.vae_validation import _Totals

    truth = torch.tensor([[[0, 0, 1, 1]]])
    logits = torch.zeros(1, 3, 1, 4)
    right = torch.tensor([[[0, 0, 1, 1]]])
    missed = torch.tensor([[[0, IGNORE_INDEX, 1, IGNORE_INDEX]]])
    scores = []
    for decoded in (right, missed):
        totals = _Totals(2)
        totals.labels(logits, decoded, truth)
        scores.append(totals.summary(bands=1)["iou"])
    assert scores == [[1.0, 1.0], [0.5, 0.5]]


def test_require_counts_fractions_of_every_pixel_unlabelled_included() -> None:
    from specdm_cli.pipeline.synthesize.require import Requirement, accepted

    labels = np.array([[[0, 1, 255, 255]], [[0, 1, 1, 255]]], dtype=np.uint8)
    keep = accepted(labels, (Requirement(1, "b", 0.5),), classes=2)
    assert keep.tolist() == [False, True]  # 1 of 4 pixels is class 1 in the first, not 1 of 2
