"""`specdm fit-detail` and `synthesize --detail` on change-detection runs: a pair's two phases
are one image of both phases' bands to the bank, looked up once within the change class."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from specdm_cli.pipeline.benchmark.generator import round_trip
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.runs.detail_io import load_bank
from specdm_cli.pipeline.runs.run_manifest import load_run
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.fit_detail import round_trips
from specdm_cli.stores import open_store
from tests.conftest import run_cli
from tests.test_synthesize import arrays, synth, train_run

QUIET = ("--threads", "2", "--quiet")


@pytest.fixture(scope="module")
def cd_banked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = train_run(tmp_path_factory.mktemp("cd-detail"), "cd")
    code, _, stderr = run_cli("fit-detail", run, _store(run), *QUIET)
    assert code == 0, stderr
    return run


def _store(run: Path) -> Path:
    return run.parent / "cd.zarr"  # train_run's store


def test_a_cd_bank_holds_both_phases_as_one_image_of_their_bands(cd_banked: Path) -> None:
    """One key and one residual per block for both phases (t1's bands, then t2's), normalised by
    the run's band statistics repeated, labelled by the change mask; the stage says so."""
    manifest, real = load_run(cd_banked), open_store(_store(cd_banked))
    bank, bands = load_bank(cd_banked, manifest), len(manifest.bands)
    blocks = len(real.indices("train")) * 16  # 16 x 16 px scenes: 16 blocks of 4 x 4
    assert bank.keys.shape == (blocks, 48) and bank.residuals.shape == (2 * bands * 16, blocks)
    run_mean = torch.tensor(manifest.normalization.mean)
    assert torch.equal(bank.mean.flatten(), torch.cat([run_mean, run_mean]))
    assert set(bank.classes.tolist()) <= {0, 1}  # no change, change
    stage = json.loads((cd_banked / "run.json").read_text())["stages"]["detail"]
    assert stage["finished"] and stage["config"]["phases"] == ["image_t1", "image_t2"]


def test_a_cd_bank_scene_gets_its_own_detail_back(cd_banked: Path) -> None:
    """Both phases of a decoded bank pair, given their own change mask, take back their real
    residuals: decoded + detail is the real pair again, to float16's precision."""
    real = open_store(_store(cd_banked))
    bank = load_bank(cd_banked, load_run(cd_banked))
    chosen = choose_model(str(cd_banked), "cd", vae_only=True)
    train = real.indices("train")[:3]
    for index, (decoded, truth, change) in zip(
        train, round_trips(chosen, real, train, torch.device("cpu"), StopFlag(), None), strict=True
    ):
        stored = real.read(int(index))
        pair = np.concatenate([stored["image_t1"], stored["image_t2"]])  # t1's bands, then t2's
        assert np.array_equal(truth.numpy(), pair)
        assert np.array_equal(change.numpy(), stored["change"])
        assert not torch.allclose(decoded, truth, atol=1.0)
        allowed = (truth - decoded).abs() * 2**-10 + 1e-2  # one float16 step, decoder noise
        assert ((decoded + bank.detail(decoded, change) - truth).abs() <= allowed).all()


def test_synthesize_detail_changes_both_phases_keeps_the_masks_and_is_deterministic(
    cd_banked: Path, tmp_path: Path
) -> None:
    plain, detailed, again = (tmp_path / f"{name}.zarr" for name in ("p", "d", "d1"))
    for out, flag in ((plain, "--no-detail"), (detailed, "--detail"), (again, "--detail")):
        code, _, stderr = synth(cd_banked, out, "--n", "4", flag)
        assert code == 0, stderr
    with_detail, without = arrays(detailed), arrays(plain)
    assert np.array_equal(with_detail["change"], without["change"])
    for phase in ("image_t1", "image_t2"):
        assert not np.array_equal(with_detail[phase], without[phase]), phase
    assert all(np.array_equal(with_detail[k], arrays(again)[k]) for k in with_detail)
    recorded = json.loads((detailed / "manifest.json").read_text())["model"]["details"]["detail"]
    assert recorded["phases"] == ["image_t1", "image_t2"]


def test_the_benchmark_s_round_trips_of_a_cd_run_get_one_detail_for_both_phases(
    cd_banked: Path,
) -> None:
    """The oracle row's round trips add the detail as synthesize does: one lookup, split."""
    real, chosen = open_store(_store(cd_banked)), choose_model(str(cd_banked), "cd")
    bank, cpu, indices = load_bank(cd_banked, chosen.manifest), torch.device("cpu"), np.arange(4)
    plain = round_trip(chosen, real, indices, cpu).samples
    detailed = round_trip(chosen, real, indices, cpu, bank=bank).samples
    for index in indices.tolist():
        change = torch.from_numpy(plain[index]["change"])
        pair = torch.from_numpy(
            np.concatenate([plain[index]["image_t1"], plain[index]["image_t2"]])
        )
        t1, t2 = bank.detail(pair, change).split(len(chosen.manifest.bands))
        assert np.array_equal(detailed[index]["change"], plain[index]["change"])
        assert torch.allclose(torch.from_numpy(detailed[index]["image_t1"]), pair[: len(t1)] + t1)
        assert torch.allclose(torch.from_numpy(detailed[index]["image_t2"]), pair[len(t1) :] + t2)


def test_the_cd_demo_model_builds_no_bank_and_refuses_detail(tmp_path: Path) -> None:
    """Only the ss demo model's bank is built on first use: the cd demo model has none."""
    cache = Path(os.environ["SPECDM_HOME"]) / "cache" / "demo-detail"
    cached = lambda: sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []  # noqa: E731
    before = cached()
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "cd", "--n", "2",
                              "--steps", "2", "--detail", "--out", tmp_path / "x.zarr")  # fmt: skip
    assert code == 2 and "no detail bank" in stderr and "cd demo model has none" in stderr
    assert "building" not in stderr and not (tmp_path / "x.zarr").exists()
    assert cached() == before
