"""The fp16 loss scaler: a plain step where it is off, the same step where it is on, resumable."""

from __future__ import annotations

from pathlib import Path

import torch

from specdm_cli.pipeline.train.common import LossScaler


def _trained(scaler: LossScaler, steps: int = 3) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    inputs = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(steps):
        scaler.step(layer(inputs).pow(2).mean(), optimizer)
    return layer


def test_off_on_the_cpu_and_equal_to_a_plain_step(tmp_path: Path) -> None:
    scaler = LossScaler(torch.device("cpu"), "fp16")
    assert not scaler.scaler.is_enabled()
    scaler.save(tmp_path)
    assert not (tmp_path / LossScaler.FILE).exists()
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    inputs = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(3):
        optimizer.zero_grad()
        layer(inputs).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(_trained(scaler).weight, layer.weight)


def test_scaling_unscales_before_the_step_and_its_state_resumes(tmp_path: Path) -> None:
    # The CPU has a GradScaler too: it stands in for CUDA fp16 here.
    scaling = LossScaler(torch.device("cpu"), "fp32")
    scaling.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    plain = _trained(LossScaler(torch.device("cpu"), "fp32"))
    torch.testing.assert_close(_trained(scaling).weight, plain.weight)
    scaling.save(tmp_path)
    resumed = LossScaler(torch.device("cpu"), "fp32")
    resumed.scaler = torch.amp.GradScaler("cpu")
    resumed.load(tmp_path)
    assert resumed.scaler.get_scale() == scaling.scaler.get_scale() == 2048.0
