"""Hostile or inconsistent manifests and options: one line and DESIGN.md's exit code, never
"unexpected ... (a bug)"; names from manifests never escape their folder; training that
diverges or fills the disk stops with its own exit code and leaves nothing half-written.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.test_faults_corrupt import VAE
from tests.test_faults_prepare import specdm


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("manifests") / "s.zarr", n=16, size=16)


def edited(pristine: Path, root: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    store = root / "s.zarr"
    shutil.copytree(pristine, store)
    manifest = json.loads((store / "manifest.json").read_text())
    change(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store


HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "short band list": lambda m: m["bands"].pop(),
    "short class list": lambda m: m["classes"].pop(),
    "short mean list": lambda m: m["normalization"]["mean"].pop(),
    "absurd count": lambda m: m.update(count=10**30),
    "std zero": lambda m: m["normalization"]["std"].__setitem__(0, 0.0),
    "short class fractions": lambda m: m["class_pixel_fraction"]["all"].pop(),
    "arrays of the other task": lambda m: m.update(arrays=["image_t1", "image_t2", "change"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_inconsistent_manifests_are_one_line_exit_3(
    pristine: Path, tmp_path: Path, case: str
) -> None:
    store = edited(pristine, tmp_path, HOSTILE[case])
    code, _, stderr = run_cli("inspect", store)
    assert_one_error_line(code, stderr, 3, "invalid manifest")


def _one_band_more(manifest: dict[str, Any]) -> None:
    manifest["bands"].append({**manifest["bands"][-1], "name": "extra"})
    for statistic in ("mean", "std", "minimum", "maximum"):
        manifest["normalization"][statistic].append(manifest["normalization"][statistic][-1])


DISAGREEING: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "dtype": (lambda m: m.update(dtype="float32"), "holds uint16, manifest says float32"),
    "bands": (_one_band_more, "manifest says 16 samples of (11, 16, 16)"),
}


@pytest.mark.parametrize("case", sorted(DISAGREEING))
def test_a_manifest_valid_alone_but_not_the_arrays_is_exit_3(
    pristine: Path, tmp_path: Path, case: str
) -> None:
    """A hand-edited dtype or band list passed `inspect --verify` (exit 0): the manifest checked
    only against itself, the arrays only against their checksums."""
    change, message = DISAGREEING[case]
    store = edited(pristine, tmp_path, change)
    code, _, stderr = run_cli("inspect", store, "--verify", "-q")
    assert_one_error_line(code, stderr, 3, message)


def test_a_manifest_nested_too_deeply_is_one_line_exit_3(pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    shutil.copytree(pristine, store)
    (store / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, stderr = run_cli("inspect", store)
    assert_one_error_line(code, stderr, 3, "nested too deeply")


@pytest.mark.parametrize("steps", ["0", "-5"])
@pytest.mark.parametrize("command", ["fit-vae", "fit-diffusion", "synthesize"])
def test_steps_below_one_are_a_usage_error(command: str, steps: str, tmp_path: Path) -> None:
    code, _, stderr = run_cli(command, str(tmp_path), "--steps", steps)
    assert code == 2, stderr
    assert "--steps" in stderr and "Traceback" not in stderr


def test_a_store_s_odd_name_makes_a_safe_run_folder_and_the_dataset_none(
    pristine: Path, tmp_path: Path
) -> None:
    store = edited(pristine, tmp_path, lambda m: m["source"].update(dataset="../../ESCAPED"))
    odd = store.rename(store.with_name("a b;$(x)..zarr"))  # the store's name names the run
    code, _, stderr = run_cli("fit-vae", odd, *VAE)  # no --run: the default run folder
    assert code == 0, stderr
    assert not list(tmp_path.rglob("ESCAPED*"))
    runs = list((tmp_path / "specdm-home" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].parent == tmp_path / "specdm-home" / "runs", runs
    assert runs[0].name.startswith("a") and not {"/", " ", ";", "$"} & set(runs[0].name), runs


def test_a_diverging_loss_stops_with_exit_4_naming_the_step(pristine: Path, tmp_path: Path) -> None:
    # A std of 1e-30 passes validation but normalises reflectance to about 1e33: the loss
    # overflows at once.
    def tiny_std(manifest: dict[str, Any]) -> None:
        stats = manifest["normalization"]
        stats["std"] = [1e-30] * len(stats["std"])

    store = edited(pristine, tmp_path, tiny_std)
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "run", *VAE)
    assert_one_error_line(code, stderr, 4, "the loss is")
    assert "at step 1" in stderr


def test_disk_full_in_a_vae_checkpoint_is_exit_5_without_partial(
    pristine: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    done = specdm("fit-vae", pristine, "--run", run, *VAE, fsize=40_000)
    assert done.returncode == 5, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no space left" in lines[0] and "Traceback" not in done.stderr
    assert not list(run.glob(".*.partial"))
