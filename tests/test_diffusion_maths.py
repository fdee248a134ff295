"""Schedule parity, EMA, and per-sample determinism of the samplers (tiny U-Nets, CPU)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from specdm_cli.models.diffusion import (
    EMA,
    ScheduleConfig,
    UNetConfig,
    alphas_cumprod,
    build_unet,
    ldm_betas,
    make_scheduler,
)
from specdm_cli.models.samplers import sample_generator, sample_latents
from specdm_cli.pipeline.train.diffusion_trainer import snr_weights


def test_betas_follow_ldm_linear_formula_in_float64() -> None:
    config = ScheduleConfig()
    betas = ldm_betas(config)
    roots = [0.0015**0.5 + (0.0155**0.5 - 0.0015**0.5) * i / 999 for i in range(1000)]
    assert torch.allclose(
        betas, torch.tensor([r * r for r in roots], dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0155)
    scheduler = make_scheduler("ddpm", config)
    assert torch.allclose(scheduler.betas.double(), betas, atol=1e-9)
    assert bool((scheduler.alphas_cumprod[1:] < scheduler.alphas_cumprod[:-1]).all())


def test_forward_process_matches_diffusers_helpers() -> None:
    # fit-diffusion keeps LDM's float64 cumprod; diffusers' helpers give the same maths.
    from diffusers.training_utils import compute_snr

    scheduler = make_scheduler("ddpm", ScheduleConfig())
    acp = torch.cumprod(1 - ldm_betas(ScheduleConfig()), dim=0).float()
    generator = torch.Generator().manual_seed(0)
    z, noise = (
        torch.randn(4, 3, 8, 8, generator=generator),
        torch.randn(4, 3, 8, 8, generator=generator),
    )
    t = torch.tensor([0, 10, 500, 999])
    a = acp[t][:, None, None, None]
    ours_noisy = a.sqrt() * z + (1 - a).sqrt() * noise
    ours_v = a.sqrt() * noise - (1 - a).sqrt() * z
    assert torch.allclose(ours_noisy, scheduler.add_noise(z, noise, t), atol=1e-5)
    assert torch.allclose(ours_v, scheduler.get_velocity(z, noise, t), atol=1e-5)
    assert torch.allclose(acp[t] / (1 - acp[t]), compute_snr(scheduler, t), rtol=1e-4)


def test_min_snr_weights_follow_the_formula() -> None:
    acp = torch.cumprod(1 - ldm_betas(ScheduleConfig()), dim=0)
    weights = snr_weights(acp, 5.0, "epsilon")
    for t in (0, 50, 200, 400, 999):
        snr = float(acp[t]) / (1 - float(acp[t]))
        assert float(weights[t]) == pytest.approx(min(snr, 5.0) / snr, rel=1e-12)
    # Low-noise steps are down-weighted, noisy ones (SNR <= 5) keep weight 1.
    assert float(weights[0]) < 0.01 and float(weights[999]) == 1.0
    assert bool((snr_weights(acp, 0.0, "epsilon") == 1).all())
    # v targets carry an extra (SNR + 1) / SNR: their weights are min(SNR, 5) / (SNR + 1).
    v_weights = snr_weights(acp, 5.0, "v_prediction")
    snr = acp / (1 - acp)
    assert torch.allclose(v_weights, weights * snr / (snr + 1), rtol=1e-12)


def test_ema_warms_up_and_two_plus_two_updates_equal_four() -> None:
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(2 / 11)  # LDM's LitEma
    copies = []
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        copies.append({k: v.clone() for k, v in ema.shadow.items()})
    assert ema.current_decay() == pytest.approx(6 / 15)
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.equal(target.weight, ema.shadow["weight"])
    assert not torch.equal(copies[0]["weight"], copies[3]["weight"])


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    config = UNetConfig(
        channels=3,
        sample_size=8,
        block_out_channels=(16, 32),
        attention=(False, True),
        norm_num_groups=8,
        attention_head_dim=8,
        layers_per_block=1,
    )
    return build_unet(config).eval()


@pytest.mark.parametrize(
    ("sampler", "steps"), [("ddpm", 6), ("ddim", 5), ("dpmpp", 5), ("unipc", 5)]
)
def test_sample_i_depends_only_on_seed_and_index(sampler: str, steps: int) -> None:
    unet = _tiny_unet()

    def draw(indices: list[int], seed: int = 7) -> torch.Tensor:
        generators = [sample_generator(seed, i) for i in indices]
        return sample_latents(
            unet,
            sampler,
            ScheduleConfig(),
            steps,
            (3, 8, 8),
            generators,
            torch.device("cpu"),
            contextlib.nullcontext,
        )  # type: ignore[arg-type]

    batch = draw([0, 1, 2, 3])
    again = draw([0, 1, 2, 3])
    assert torch.equal(batch, again)
    assert torch.isfinite(batch).all()
    assert not torch.equal(batch, draw([0, 1, 2, 3], seed=8))
    reordered = draw([2, 3, 0, 1])
    assert torch.allclose(reordered[0], batch[2], atol=1e-5)


class _GaussianOracle(torch.nn.Module):
    """The exact denoiser of data ~ N(0, spread^2 I): its probability-flow ODE maps x_T to
    x_T * spread / std(x_T), so an ODE solver's error against that is measurable."""

    def __init__(self, spread: float, prediction: str):
        super().__init__()
        self.spread, self.prediction = spread, prediction
        self.acp = alphas_cumprod(ScheduleConfig()).float()

    def forward(self, noisy: torch.Tensor, timestep: torch.Tensor) -> Any:
        a = self.acp[int(timestep)]
        clean = a.sqrt() * self.spread**2 * noisy / (a * self.spread**2 + 1 - a)
        noise = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        velocity = a.sqrt() * noise - (1 - a).sqrt() * clean
        return SimpleNamespace(sample=noise if self.prediction == "epsilon" else velocity)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp", "unipc"])
def test_ode_samplers_converge_to_the_exact_flow_of_gaussian_data(
    sampler: str, prediction: str
) -> None:
    # A wrong schedule, prediction type or timestep spacing leaves an error of order 1.
    spread, schedule = 0.5, ScheduleConfig(prediction_type=prediction)  # type: ignore[arg-type]
    oracle = _GaussianOracle(spread, prediction)
    noise = torch.stack([torch.randn(2, 4, 4, generator=sample_generator(0, i)) for i in range(8)])
    last = float(oracle.acp[-1])
    exact = noise * spread / (last * spread**2 + 1 - last) ** 0.5

    def error(steps: int) -> float:
        generators = [sample_generator(0, i) for i in range(8)]
        cpu = torch.device("cpu")
        drawn = sample_latents(oracle, sampler, schedule, steps, (2, 4, 4), generators, cpu,
                               contextlib.nullcontext)  # type: ignore[arg-type]  # fmt: skip
        return float((drawn - exact).norm() / exact.norm())

    few, many = error(5), error(50)
    assert many < 0.08 and many < few / 4


@pytest.mark.parametrize(("side", "levels"), [(2, 2), (4, 3), (6, 2), (16, 3), (32, 4)])
def test_presets_fit_small_latents(side: int, levels: int) -> None:
    config = UNetConfig.for_latent(3, side, norm_num_groups=4, attention_head_dim=8)
    assert len(config.block_out_channels) == levels == len(config.attention)
    small = config.model_copy(update={"block_out_channels": (8, 16, 16, 16)[:levels]})
    unet = build_unet(small)
    out = unet(torch.zeros(1, 3, side, side), torch.tensor([10])).sample
    assert out.shape == (1, 3, side, side)
