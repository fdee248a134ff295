"""`synthesize` without `--model`: the registry's best run (its whole recipe trained) over newer
short or unfinished ones, named with the reason on stderr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from specdm_cli.presets import DIFFUSION_PRESETS, VAE_PRESETS
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli

VAE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
       *PAPER_LOSS,
       "--batch-size", "4", "--threads", "1", "--workers", "1", "-q")  # fmt: skip
UNET = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8",
        "--layers-per-block", "1", "--batch-size", "8", "--threads", "1", "-q")  # fmt: skip


def train(store: Path, run: Path, *unet_steps: str) -> None:
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE)
    assert code == 0, stderr
    code, _, stderr = run_cli("fit-diffusion", run, *UNET, *unet_steps)
    assert code == 0, stderr


def chosen_line(tmp_path: Path, name: str) -> str:
    code, _, stderr = run_cli("synthesize", "--task", "ss", "--n", "2", "--steps", "2",
                              "--out", tmp_path / name)  # fmt: skip
    assert code == 0, stderr
    return next(line for line in stderr.splitlines() if line.startswith("model: "))


def test_a_finished_recipe_beats_newer_short_and_unfinished_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cpu recipe shrunk to 2 steps each, so a tiny run can train all of it.
    monkeypatch.setitem(VAE_PRESETS["cpu"], "steps", 2)
    monkeypatch.setitem(DIFFUSION_PRESETS["cpu"], "steps", 2)
    store = prepare_demo(tmp_path / "ss.zarr", n=24, size=16)
    full, short = tmp_path / "older", tmp_path / "newer"
    train(store, full)
    train(store, short, "--steps", "1")  # newer, but one U-Net step of the recipe's two

    line = chosen_line(tmp_path, "a.zarr")
    assert line.startswith(f"model: {full.resolve()} (registry")
    assert "the newest registered ss run that trained its whole recipe" in line
    assert "passed over 1 newer (newer: trained only 1 of the cpu preset's 2 U-Net steps)" in line

    # Alone, the short run is used (the user's data beats the demo's), with a warning.
    shutil.rmtree(full)
    line = chosen_line(tmp_path, "b.zarr")
    assert line.startswith(f"model: {short.resolve()} (registry")
    assert (
        "though it trained only 1 of the cpu preset's 2 U-Net steps: expect rough samples" in line
    )

    # A run whose resume was interrupted cannot sample: the demo, saying why.
    manifest = json.loads((short / "run.json").read_text())
    manifest["stages"]["diffusion"]["finished"] = False
    (short / "run.json").write_text(json.dumps(manifest))
    line = chosen_line(tmp_path, "c.zarr")
    assert line.startswith("model: demo (ss with its detail bank, sha256 ")
    assert (
        "no registered ss run can sample (newer: unfinished (diffusion stopped at step 1))" in line
    )
    # Named with --model, it says what to type next (it said "finish fit-vae and fit-diffusion").
    code, _, stderr = run_cli("synthesize", "--model", short, "--n", "2", "--out", tmp_path / "d")
    assert code == 4 and "the run cannot sample yet" in stderr
    assert "finish it: `specdm fit-diffusion RUN --resume` (stopped at step 1)" in stderr


def test_given_masks_pick_the_newest_mask_conditioned_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(VAE_PRESETS["cpu"], "steps", 2)  # both runs train their whole recipe
    monkeypatch.setitem(DIFFUSION_PRESETS["cpu"], "steps", 2)
    store = prepare_demo(tmp_path / "ss.zarr", n=24, size=16)
    conditioned, plain = tmp_path / "older", tmp_path / "newer"
    train(store, conditioned, "--mask-condition-rate", "0.5")
    train(store, plain)
    assert chosen_line(tmp_path, "joint.zarr").startswith(f"model: {plain.resolve()} (registry")
    code, _, stderr = run_cli("synthesize", "--task", "ss", "--n", "2", "--steps", "2",
                              "--masks", store, "--out", tmp_path / "given.zarr")  # fmt: skip
    assert code == 0, stderr
    line = next(line for line in stderr.splitlines() if line.startswith("model: "))
    assert line.startswith(f"model: {conditioned.resolve()} (registry")
    assert "passed over 1 newer (newer: not mask-conditioned)" in line


def test_a_model_path_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    """It was told as "unreadable run.json ([Errno 20] Not a directory: ...)"."""
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    code, _, stderr = run_cli("synthesize", "--model", tmp_path / "weights.safetensors",
                              "--n", "1", "--out", tmp_path / "s.zarr")  # fmt: skip
    assert code == 4 and "names a file, not a run folder" in stderr and "Errno" not in stderr


def test_the_demo_is_named_as_the_demo_with_or_without_its_bank(tmp_path: Path) -> None:
    """The line gave the demo's folder (inside the package, or a cache folder named after the
    shipped model's digest beside the printed digest of the copy with its bank; review13 F8)."""
    lines = []
    for detail in ("--detail", "--no-detail"):
        code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "1",
                                  "--steps", "1", "--out", tmp_path / f"{detail}.zarr",
                                  detail)  # fmt: skip
        assert code == 0, stderr
        lines.append(next(line for line in stderr.splitlines() if line.startswith("model: ")))
    digests = [json.loads((tmp_path / f"{d}.zarr" / "manifest.json").read_text())["plan"]
               ["model_sha256"][:12] for d in ("--detail", "--no-detail")]  # fmt: skip
    banked, plain = lines
    assert banked.startswith(f"model: demo (ss with its detail bank, sha256 {digests[0]}; cached")
    assert plain == f"model: demo (ss, sha256 {digests[1]}); the shipped demo model"
    assert digests[0] != digests[1]
