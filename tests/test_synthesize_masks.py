"""`specdm synthesize --masks`: images drawn for given label maps by a mask-conditioned U-Net."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import specdm_cli
from tests import processes
from tests.conftest import prepare_demo, run_cli
from tests.test_synthesize import FAST, UNET, VAE, arrays

CONDITIONED = ("--mask-condition-rate", "0.5")


def train_runs(root: Path, task: str) -> tuple[Path, Path, Path]:
    """A store, a mask-conditioned run and an unconditioned one on the same VAE."""
    store = prepare_demo(root / f"{task}.zarr", n=24, size=16, task=task)
    vae = root / "vae"
    code, _, stderr = run_cli("fit-vae", store, "--run", vae, *VAE)
    assert code == 0, stderr
    runs = []
    for name, extra in (("conditioned", CONDITIONED), ("plain", ())):
        run = shutil.copytree(vae, root / name, ignore=shutil.ignore_patterns(".specdm*lock"))
        code, _, stderr = run_cli("fit-diffusion", run, *UNET, *extra)
        assert code == 0, stderr
        runs.append(run)
    return store, runs[0], runs[1]


@pytest.fixture(scope="module")
def ss(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return train_runs(tmp_path_factory.mktemp("masks-ss"), "ss")


def synth(run: Path, out: Path, *extra: str | Path) -> tuple[int, str, str]:
    return run_cli("synthesize", "--model", run, "--out", out, *FAST, *extra)


def given_labels(store: Path, name: str = "mask") -> np.ndarray:
    """The label maps of a store's written samples, in index order."""
    data = arrays(store)
    return data[name][np.flatnonzero(data["written"].astype(bool))]


def test_labels_are_the_given_masks_and_the_manifest_names_them(
    ss: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    store, run, _ = ss
    out = tmp_path / "syn.zarr"
    code, _, stderr = synth(run, out, "--n", "10", "--masks", store)
    assert code == 0, stderr
    np.testing.assert_array_equal(arrays(out)["mask"], given_labels(store)[:10])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["plan"]["masks"] == str(store.resolve())
    source = manifest["model"]["details"]["mask_source"]
    assert (
        source["masks_sha256"] == manifest["plan"]["masks_sha256"]
        and len(source["masks_sha256"]) == 64
    )
    # The class fractions are the given masks'.
    fractions = np.asarray(zarr.open_group(out, mode="r")["class_fraction"][:])
    assert np.allclose(fractions.sum(axis=1), 1, atol=1e-5)


def test_a_split_and_n_beyond_it_cycle_through_its_masks(
    ss: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    store, run, _ = ss
    from specdm_cli.stores import open_store

    reader = open_store(store)
    test = reader.indices("test")
    out = tmp_path / "syn.zarr"
    n = len(test) + 3
    code, _, stderr = synth(run, out, "--n", str(n), "--masks", store, "--masks-split", "test")
    assert code == 0, stderr
    expected = np.stack([reader.read(int(test[i % len(test)]))["mask"] for i in range(n)])
    np.testing.assert_array_equal(arrays(out)["mask"], expected)
    # The repeats are new images: each sample has its own seed.
    images = arrays(out)["image"]
    assert not np.array_equal(images[0], images[len(test)])


def test_sample_i_depends_only_on_seed_and_i(ss: tuple[Path, Path, Path], tmp_path: Path) -> None:
    store, run, _ = ss
    for name, extra in (
        ("a", ("--n", "6")),
        ("b", ("--n", "10")),
        ("c", ("--n", "6", "--seed", "1")),
    ):
        code, _, stderr = synth(run, tmp_path / f"{name}.zarr", "--masks", store, *extra)
        assert code == 0, stderr
    a, b, c = (arrays(tmp_path / f"{name}.zarr") for name in "abc")
    np.testing.assert_array_equal(a["image"], b["image"][:6])
    np.testing.assert_array_equal(a["mask"], c["mask"])
    assert not np.array_equal(a["image"], c["image"])


def test_shards_and_a_killed_run_give_the_single_run_bytes(
    ss: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    store, run, _ = ss
    assert synth(run, tmp_path / "whole.zarr", "--n", "12", "--masks", store)[0] == 0
    whole = arrays(tmp_path / "whole.zarr")
    for shard in ("0/2", "1/2"):
        code, _, stderr = synth(
            run, tmp_path / "sharded.zarr", "--n", "12", "--masks", store, "--shard", shard
        )
        assert code == 0, stderr
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "specdm_cli", "synthesize", "--model", str(run), "--out",
               str(out), "--n", "12", "--masks", str(store), *FAST]  # fmt: skip
    killed = processes.run(
        command, env={**os.environ, "SPECDM_FAULT": "synthesize.after_batch:2"}, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = processes.run([*command, "--resume"], text=True)
    assert resumed.returncode == 0, resumed.stderr
    for other in (arrays(tmp_path / "sharded.zarr"), arrays(out)):
        for name in ("image", "mask", "written"):
            np.testing.assert_array_equal(whole[name], other[name], err_msg=name)
    # Another mask source cannot join or resume the store.
    code, _, stderr = synth(
        run, out, "--n", "12", "--masks", store, "--masks-split", "train", "--resume"
    )
    assert code == 3 and "--masks-split" in stderr


def test_guidance_is_part_of_the_plan(ss: tuple[Path, Path, Path], tmp_path: Path) -> None:
    store, run, _ = ss
    guided, plain = tmp_path / "guided.zarr", tmp_path / "plain.zarr"
    assert synth(run, guided, "--n", "4", "--masks", store)[0] == 0
    assert synth(run, plain, "--n", "4", "--masks", store, "--mask-guidance", "1")[0] == 0
    plans = [json.loads((s / "manifest.json").read_text())["plan"] for s in (guided, plain)]
    assert [p["mask_guidance"] for p in plans] == [2.0, 1.0]
    a, b = arrays(guided), arrays(plain)
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], b["image"])
    code, _, stderr = synth(run, plain, "--n", "4", "--masks", store, "--resume")
    assert code == 3 and "--mask-guidance" in stderr


def test_a_conditioned_model_still_samples_jointly(
    ss: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    _, run, _ = ss
    code, _, stderr = synth(run, tmp_path / "joint.zarr", "--n", "4")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "joint.zarr" / "manifest.json").read_text())
    assert "masks" not in manifest["plan"] and manifest["complete"]


def _one_line_refusal(result: tuple[int, str, str], expected: int, words: str, out: Path) -> None:
    code, _, stderr = result
    assert code == expected, stderr
    assert stderr.startswith("error:") and words in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()


def test_refusals(
    ss: tuple[Path, Path, Path], tmp_path: Path, demo_ss_store: Path, demo_cd_store: Path
) -> None:
    store, run, plain = ss
    out = tmp_path / "x.zarr"
    _one_line_refusal(
        synth(plain, out, "--n", "2", "--masks", store),
        2, f"`specdm fit-diffusion {plain} --mask-condition-rate 0.5 --overwrite`", out,
    )  # fmt: skip
    _one_line_refusal(synth(run, out, "--n", "2", "--masks", demo_cd_store), 3, "task cd", out)
    _one_line_refusal(synth(run, out, "--n", "2", "--masks", demo_ss_store), 3, "32x32", out)
    _one_line_refusal(
        synth(run, out, "--n", "2", "--masks", tmp_path / "none"), 3, "does not exist", out
    )
    _one_line_refusal(synth(run, out, "--n", "2", "--masks-split", "test"), 2, "--masks", out)
    _one_line_refusal(synth(run, out, "--n", "2", "--mask-guidance", "3"), 2, "--masks", out)
    _one_line_refusal(
        synth(run, out, "--n", "2", "--masks", store, "--mask-guidance", "0.5"), 2, "below 1", out
    )
    _one_line_refusal(
        synth(run, out, "--n", "2", "--masks", store, "--masks-split", "nope"), 3, "nope", out
    )
    _one_line_refusal(
        synth(run, out, "--n", "2", "--masks", store, "--require", "0:0.1"), 2, "--require", out
    )
    _one_line_refusal(
        synth(run, out, "--n", "2", "--masks", store, "--label-confidence", "0.5"),
        2, "--label-confidence", out,
    )  # fmt: skip
    _one_line_refusal(
        synth(run, store / "inner", "--n", "2", "--masks", store), 2, "overlaps", store / "inner"
    )


def test_cd_draws_both_phases_for_the_given_change_masks(tmp_path: Path) -> None:
    store, run, _ = train_runs(tmp_path, "cd")
    out = tmp_path / "syn.zarr"
    code, _, stderr = synth(run, out, "--n", "5", "--masks", store)
    assert code == 0, stderr
    data = arrays(out)
    np.testing.assert_array_equal(data["change"], given_labels(store, "change")[:5])
    assert data["image_t1"].shape == data["image_t2"].shape == (5, 10, 16, 16)


def test_distill_refuses_a_mask_conditioned_u_net(ss: tuple[Path, Path, Path]) -> None:
    # Its student would be joint only; the refusal comes before anything is written.
    _, run, _ = ss
    before = (run / "run.json").read_text()
    code, _, stderr = run_cli("distill", run, "--steps", "1", "--trajectories", "2", "--quiet")
    assert code == 2 and "--mask-condition-rate" in stderr and "Traceback" not in stderr
    assert (run / "run.json").read_text() == before


@pytest.mark.slow  # a U-Net trained 2 steps on the shipped model's copy: about 20 s
def test_the_demo_model_refusal_says_what_works_and_it_does(tmp_path: Path) -> None:
    """The fix told was `specdm fit-diffusion --mask-condition-rate 0.5`, with no RUN (and the
    shipped model is read-only, its training store not shipped)."""
    out = tmp_path / "x.zarr"
    sample = ("--n", "2", "--steps", "2", "--no-detail", "--quiet", "--out", out)
    masks = prepare_demo(tmp_path / "m.zarr", size=64)
    _one_line_refusal(
        run_cli("synthesize", "--model", "demo", "--task", "ss", *sample, "--masks", masks),
        2, "copy the package's specdm_cli/assets/demo-ss folder to COPY", out,
    )  # fmt: skip
    # What the line says, done: the copy, a demo store, its U-Net trained with the condition.
    copy = shutil.copytree(Path(specdm_cli.__file__).parent / "assets" / "demo-ss", tmp_path / "c")
    code, _, stderr = run_cli("prepare", "demo", "--task", "ss", "--n", "24", "--out",
                              tmp_path / "demo.zarr", "--quiet")  # fmt: skip
    assert code == 0, stderr
    code, _, stderr = run_cli("fit-diffusion", copy, "--store", tmp_path / "demo.zarr",
                              "--mask-condition-rate", "0.5", "--overwrite", "--steps", "2",
                              "--quiet")  # fmt: skip
    assert code == 0, stderr
    code, _, stderr = run_cli("synthesize", "--model", copy, *sample, "--masks", masks)
    assert code == 0, stderr
