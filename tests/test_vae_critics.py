"""`fit-vae --semantic-weight`, `--adversarial-weight` (issue 20 §2) and `--gradient-weight`: tiny real training runs,
run.json, resume equality, refusals; and the maths of the terms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from specdm_cli.models.feature_net import FeatureNetConfig, build_network
from specdm_cli.models.image_critics import (
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_weight,
    hinge_discriminator_loss,
    patch_layers,
    semantic_loss,
)
from tests.conftest import run_cli
from tests.test_fit_vae_cli import TINY, fit, weights

SEMANTIC = ("--semantic-weight", "1", "--semantic-steps", "4")
ADVERSARIAL = ("--adversarial-weight", "0.5", "--adversarial-start", "1")
GRADIENT = ("--gradient-weight", "2")


def records(run: Path) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_semantic_weight_trains_a_segmenter_first_and_records_it(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code, _stdout, stderr = fit(demo_ss_store, run, "--steps", "2", *SEMANTIC, "--json")
    assert code == 0, stderr
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    assert stage["config"]["semantic_weight"] == 1.0
    segmenter = stage["details"]["segmenter"]
    assert segmenter["steps"] == 4 and segmenter["config"]["steps"] == 4
    assert 0.0 <= segmenter["val_miou"] <= 1.0 and segmenter["val_samples"] > 0
    assert any(Path(p).parts[-2:] == ("segmenter", "model.safetensors") for p in stage["weights"])
    terms = records(run)
    assert all(r["image/semantic"] > 0 for r in terms)
    # The term is part of the image loss: total = l1 + 0.1 sad + kl term + 1 x semantic.
    last = terms[-1]
    assert (
        last["image/total"]
        > last["image/l1"] + 0.1 * last["image/sad"] + 0.99 * last["image/semantic"]
    )
    assert "image/semantic" not in records_of_plain_run(demo_ss_store, tmp_path)[-1]


def test_a_run_shorter_than_its_segmenter_says_what_it_trains_first(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    """`fit-vae --steps 2` under the cpu preset trained a 300-step segmenter first, unsaid."""
    told = [arg for arg in TINY if arg != "--quiet"]
    for steps, said in (("2", True), ("4", False)):
        run = tmp_path / f"run{steps}"
        command = ("fit-vae", demo_ss_store, "--run", run, *told, "--steps", steps, *SEMANTIC)
        code, _stdout, stderr = run_cli(*command)
        assert code == 0, stderr
        note = f"note: the semantic term's segmenter trains 4 steps before the VAE's {steps} "
        assert (note in stderr) == said, stderr


def records_of_plain_run(store: Path, tmp_path: Path) -> list[dict[str, float]]:
    code, _stdout, stderr = fit(store, tmp_path / "plain", "--steps", "1")
    assert code == 0, stderr
    return records(tmp_path / "plain")


def test_adversarial_term_starts_at_its_step_and_keeps_its_discriminator(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code, _stdout, stderr = fit(demo_ss_store, run, "--steps", "3", *ADVERSARIAL)
    assert code == 0, stderr
    terms = records(run)
    assert "image/adversarial" not in terms[0]  # step 1 is before --adversarial-start 1 ends
    assert all(r["image/adversarial_weight"] >= 0 for r in terms[1:])
    assert all("image/discriminator" in r for r in terms[1:])
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    names = {Path(p).parts[-2:] for p in stage["weights"]}
    assert {("discriminator", "model.safetensors"), ("discriminator", "optimizer.safetensors")} <= (
        names
    )


@pytest.mark.parametrize("extra", [(*SEMANTIC, *ADVERSARIAL), ()])
def test_resume_with_the_critics_equals_one_run(
    demo_ss_store: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """2 + 2 steps equal 4: the segmenter, the discriminator and its optimizer are restored."""
    assert fit(demo_ss_store, tmp_path / "whole", "--steps", "4", *extra)[0] == 0
    assert fit(demo_ss_store, tmp_path / "split", "--steps", "2", *extra)[0] == 0
    code, stdout, stderr = fit(
        demo_ss_store, tmp_path / "split", "--steps", "4", "--resume", "--json", *extra
    )
    assert code == 0, stderr
    assert json.loads(stdout)["state"] == "resumed"
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    assert any(name.startswith("discriminator/optimizer") for name in whole) == bool(extra)
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_cd_and_single_stream_take_every_term(demo_cd_store: Path, tmp_path: Path) -> None:
    for name, extra in (("two", ()), ("single", ("--single-stream",))):
        run = tmp_path / name
        code, _stdout, stderr = fit(
            demo_cd_store, run, "--steps", "2", *SEMANTIC, *ADVERSARIAL, *GRADIENT, *extra
        )
        assert code == 0, stderr
        prefix = "joint" if extra else "image"
        terms = {f"{prefix}/semantic", f"{prefix}/adversarial", f"{prefix}/gradient"}
        assert terms <= records(run)[-1].keys()


def test_gradient_weight_is_recorded_logged_and_kept_on_resume(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "1", *GRADIENT)[0] == 0
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    assert stage["config"]["gradient_weight"] == 2.0
    last = records(run)[-1]
    # The image loss is l1 + 0.1 sad + 2 x gradient (+ a KL term orders of magnitude smaller).
    extra = last["image/total"] - last["image/l1"] - 0.1 * last["image/sad"]
    assert last["image/gradient"] > 0
    assert extra == pytest.approx(2 * last["image/gradient"], rel=1e-3)
    assert "image/gradient" not in records_of_plain_run(demo_ss_store, tmp_path)[-1]
    code, _stdout, stderr = fit(
        demo_ss_store, run, "--steps", "2", "--resume", "--gradient-weight", "1"
    )
    assert code != 0 and "gradient_weight" in stderr and "Traceback" not in stderr
    # A resume without the option keeps the recorded weight: 1 + 1 steps equal 2.
    assert fit(demo_ss_store, run, "--steps", "2", "--resume")[0] == 0
    assert fit(demo_ss_store, tmp_path / "whole", "--steps", "2", *GRADIENT)[0] == 0
    whole, split = weights(tmp_path / "whole"), weights(run)
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    single = tmp_path / "single"
    code, _stdout, stderr = fit(
        demo_ss_store, single, "--steps", "1", "--gradient-weight", "1", "--single-stream"
    )
    assert code == 0, stderr
    assert records(single)[-1]["joint/gradient"] > 0


def test_a_resume_with_another_weight_is_refused(demo_ss_store: Path, tmp_path: Path) -> None:
    assert fit(demo_ss_store, tmp_path / "run", "--steps", "1", *SEMANTIC)[0] == 0
    code, _stdout, stderr = fit(
        demo_ss_store, tmp_path / "run", "--steps", "2", "--resume", "--semantic-weight", "2",
        "--semantic-steps", "4",
    )  # fmt: skip
    assert (
        code != 0 and "--semantic-weight: run 1.0, now 2.0" in stderr and "Traceback" not in stderr
    )


def test_a_damaged_discriminator_is_a_model_error(demo_ss_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "1", *ADVERSARIAL)[0] == 0
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    config = run / stage["checkpoint"] / "discriminator" / "config.json"
    config.write_text('{"bands": 3}')
    code, _stdout, stderr = fit(demo_ss_store, run, "--steps", "2", "--resume", *ADVERSARIAL)
    assert code == 4, stderr
    assert "discriminator" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--semantic-weight", "-1"), "--semantic-weight"),
        (("--semantic-steps", "0"), "--semantic-steps"),
        (("--adversarial-weight", "-0.5"), "--adversarial-weight"),
        (("--adversarial-start", "-1"), "--adversarial-start"),
        (("--adversarial-weight", "1", "--gpus", "cpu:2"), "one device"),
    ],
)
def test_bad_critic_options_are_usage_errors(
    demo_ss_store: Path, tmp_path: Path, extra: tuple[str, ...], words: str
) -> None:
    code, _stdout, stderr = fit(demo_ss_store, tmp_path / "run", "--steps", "1", *extra)
    assert code == 2 and words in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_semantic_loss_trains_the_decoder_not_the_segmenter() -> None:
    torch.manual_seed(0)
    segmenter = build_network(FeatureNetConfig(task="ss", bands=3, classes=4)).eval()
    segmenter.requires_grad_(False)
    decoder = nn.Conv2d(3, 3, 1)
    recon = decoder(torch.randn(2, 3, 16, 16))
    labels = torch.randint(0, 4, (2, 16, 16))
    labels[0, 0, 0] = 255
    loss = semantic_loss(segmenter, recon, labels, 1, None)
    loss.backward()
    assert decoder.weight.grad is not None and decoder.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in segmenter.parameters())
    # cd: the two phases stacked on the batch axis reach the siamese network as a pair.
    change = build_network(FeatureNetConfig(task="cd", bands=3, classes=2)).eval()
    pair = torch.randn(4, 3, 16, 16)
    value = semantic_loss(change, pair, torch.randint(0, 2, (2, 16, 16)), 2, None)
    assert value.ndim == 0 and torch.isfinite(value)


def test_adaptive_weight_is_the_ratio_of_gradient_norms() -> None:
    last = torch.ones(3, requires_grad=True)
    nll = (2.0 * last).sum()  # gradient (2, 2, 2), norm 2 sqrt(3)
    generator_loss = (0.5 * last).sum()  # gradient norm sqrt(3) / 2
    expected = 2 * 3**0.5 / (3**0.5 / 2 + 1e-4)
    assert adaptive_weight(nll, generator_loss, last).item() == pytest.approx(expected)
    assert adaptive_weight(nll, 1e-9 * generator_loss, last).item() == 1e4  # clamped


def test_patch_discriminator_takes_any_band_count() -> None:
    for bands in (1, 10, 13):
        net = PatchDiscriminator(DiscriminatorConfig(bands=bands))
        assert net(torch.randn(2, bands, 64, 64)).shape == (2, 1, 6, 6)
    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert hinge_discriminator_loss(real, fake).item() == 0.0  # both beyond the margin
    assert hinge_discriminator_loss(fake, real).item() == pytest.approx(3.0)


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 30-60 s
def test_two_cpu_ranks_train_with_the_semantic_term(demo_ss_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _stdout, stderr = fit(demo_ss_store, run, "--steps", "2", "--gpus", "cpu:2", *SEMANTIC)
    assert code == 0, stderr
    stage = json.loads((run / "run.json").read_text())["stages"]["vae"]
    assert stage["finished"] and 0.0 <= stage["details"]["segmenter"]["val_miou"] <= 1.0
    assert all("image/semantic" in r for r in records(run))


def test_a_run_made_before_the_terms_existed_resumes(demo_ss_store: Path, tmp_path: Path) -> None:
    """Its run.json has no semantic or adversarial keys: with the terms off, it matches."""
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "1")[0] == 0
    manifest = json.loads((run / "run.json").read_text())
    config = manifest["stages"]["vae"]["config"]
    assert not {k for k in config if k.startswith(("semantic", "adversarial"))}
    code, stdout, stderr = fit(demo_ss_store, run, "--steps", "2", "--resume", "--json")
    assert code == 0 and json.loads(stdout)["state"] == "resumed", stderr


def test_patch_layers_fit_the_scene_and_keep_ldms_three_from_24_px() -> None:
    assert [patch_layers(size) for size in (4, 6, 12, 16, 23, 24, 64, 256)] == [
        0, 1, 2, 2, 2, 3, 3, 3,
    ]  # fmt: skip
    for size in (6, 12, 16, 24):
        network = PatchDiscriminator(DiscriminatorConfig(bands=2, layers=patch_layers(size)))
        assert network(torch.zeros(1, 2, size, size)).shape[-1] >= 1


def test_adversarial_term_runs_on_16_px_scenes(tmp_path: Path) -> None:
    from tests.conftest import prepare_demo

    store = prepare_demo(tmp_path / "small.zarr", n=24, size=16)
    run = tmp_path / "run"
    code, _stdout, stderr = fit(store, run, "--steps", "2", *ADVERSARIAL)
    assert code == 0, stderr  # was "unexpected RuntimeError ... Kernel size can't be greater"
    config = json.loads(
        (run / json.loads((run / "run.json").read_text())["stages"]["vae"]["checkpoint"]
         / "discriminator" / "config.json").read_text()
    )  # fmt: skip
    assert config["layers"] == 2
