"""`specdm fit-detail` and `synthesize --detail`: the bank's stage in the run, its lookups, its
use in synthesis, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from specdm_cli.models.detail import Bank, Lookup
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
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("detail"), "ss")


def _store(run: Path) -> Path:
    return run.parent / "ss.zarr"  # train_run's store


def _copy(run: Path, target: Path) -> Path:
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns(".specdm*")))


@pytest.fixture(scope="module")
def banked(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = _copy(trained, tmp_path_factory.mktemp("banked") / "run")
    code, _, stderr = run_cli("fit-detail", run, _store(trained), *QUIET)
    assert code == 0, stderr
    return run


def _stage(run: Path) -> Any:
    return json.loads((run / "run.json").read_text())["stages"]["detail"]


def test_the_chunked_lookup_finds_what_a_full_distance_matrix_does() -> None:
    """Bank blocks scored in chunks, a running minimum across them: the nearest of all."""
    draw = torch.Generator().manual_seed(0)
    lookup = Lookup(block=2, context=4, dims=6)
    keys = torch.randn(5000, 6, generator=draw)  # three chunks, the last one partial
    ones = torch.ones(3, 1, 1)
    basis = torch.randn(3 * 16, 6, generator=draw)
    bank = Bank(lookup, ones * 0, ones, torch.zeros(3 * 16), basis, keys, torch.zeros(12, 5000))
    image = torch.randn(3, 32, 32, generator=draw)
    expected = torch.cdist(bank.features(image), keys).argmin(dim=1)
    assert torch.equal(bank.nearest(image), expected) and len(expected) == 256


def test_a_bank_scene_gets_its_own_detail_back(banked: Path, trained: Path) -> None:
    """Each block of a decoded bank scene finds its own surroundings nearest: decoded + detail
    is the real scene again, to float precision (blocks, folds and lookups line up)."""
    stage, real = _stage(banked), open_store(_store(trained))
    train = real.indices("train")
    assert stage["finished"] and stage["details"]["scenes"] == len(train)
    assert list(stage["weights"]) == [f"{stage['checkpoint']}/bank.safetensors"]
    bank = load_bank(banked, load_run(banked))
    assert bank.keys.shape == (len(train) * 16, 48)  # 16 x 16 px scenes: 16 blocks of 4 x 4
    chosen = choose_model(str(banked), "ss", vae_only=True)
    pairs = round_trips(chosen, real, train[:3], torch.device("cpu"), StopFlag(), None)
    for decoded, truth in pairs:
        assert not torch.allclose(decoded, truth, atol=1.0)
        torch.testing.assert_close(decoded + bank.detail(decoded), truth, rtol=0, atol=1e-2)


def test_the_same_command_finds_it_built_and_other_options_need_overwrite(
    trained: Path, tmp_path: Path
) -> None:
    run = _copy(trained, tmp_path / "run")
    store = _store(trained)
    code, stdout, stderr = run_cli("fit-detail", run, store, "--scenes", "4", "--json", *QUIET)
    assert code == 0, stderr
    assert json.loads(stdout)["state"] == "built" and json.loads(stdout)["scenes"] == 4
    first = _stage(run)["weights"]
    code, stdout, _ = run_cli("fit-detail", run, store, "--scenes", "4", "--json", *QUIET)
    assert code == 0 and json.loads(stdout)["state"] == "already complete"
    code, _, stderr = run_cli("fit-detail", run, store, "--scenes", "4", "--dims", "8", *QUIET)
    assert code == 4 and "--overwrite" in stderr and "Traceback" not in stderr
    assert _stage(run)["weights"] == first
    code, _, stderr = run_cli(
        "fit-detail", run, store, "--scenes", "4", "--dims", "8", "--overwrite", *QUIET
    )
    assert code == 0, stderr
    assert _stage(run)["weights"] != first and _stage(run)["config"]["dims"] == 8
    assert [p.name for p in (run / "checkpoints").glob("detail-*")] == ["detail-0000001"]


def test_synthesize_detail_changes_images_only_and_is_recorded_and_deterministic(
    banked: Path, tmp_path: Path
) -> None:
    plain, detailed, again = tmp_path / "p.zarr", tmp_path / "d.zarr", tmp_path / "d1.zarr"
    assert synth(banked, plain, "--n", "4")[0] == 0
    code, _, stderr = synth(banked, detailed, "--n", "4", "--detail")
    assert code == 0, stderr
    code, _, stderr = synth(banked, again, "--n", "4", "--detail", "--threads", "1")
    assert code == 0, stderr
    with_detail, without = arrays(detailed), arrays(plain)
    assert np.array_equal(with_detail["mask"], without["mask"])
    assert not np.array_equal(with_detail["image"], without["image"])
    assert all(np.array_equal(with_detail[k], arrays(again)[k]) for k in with_detail)
    manifest = json.loads((detailed / "manifest.json").read_text())
    assert manifest["plan"]["detail"] == _stage(banked)["weights"]
    recorded = manifest["model"]["details"]["detail"]
    assert (recorded["block"], recorded["context"], recorded["dims"]) == (4, 8, 48)
    assert "detail" not in json.loads((plain / "manifest.json").read_text())["plan"]


def test_refusals_are_one_line(trained: Path, banked: Path, tmp_path: Path) -> None:
    code, _, stderr = synth(trained, tmp_path / "x.zarr", "--n", "2", "--detail")
    assert code == 2 and "no detail bank" in stderr and "fit-detail" in stderr
    assert not (tmp_path / "x.zarr").exists()
    stale = _copy(banked, tmp_path / "stale")
    manifest = json.loads((stale / "run.json").read_text())
    manifest["stages"]["detail"]["config"]["vae_weights"] = {"image": "0" * 64}
    (stale / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = synth(stale, tmp_path / "y.zarr", "--n", "2", "--detail")
    assert code == 4 and "earlier VAE" in stderr and "--overwrite" in stderr
    code, _, stderr = run_cli("fit-detail", banked, _store(trained), "--context", "5", *QUIET)
    assert code == 2 and "--context" in stderr
    cd = _copy(trained, tmp_path / "cd")
    manifest = json.loads((cd / "run.json").read_text())
    (cd / "run.json").write_text(json.dumps({**manifest, "task": "cd"}))
    code, _, stderr = run_cli("fit-detail", cd, _store(trained), *QUIET)
    assert code == 2 and "semantic segmentation only" in stderr and "Traceback" not in stderr
