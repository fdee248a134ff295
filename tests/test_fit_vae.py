"""fit-vae paths that test_fit_vae_cli.py leaves open: save/load bit-exactness, interrupts,
refusals of stores and run folders, --limit, the validation fallback, the registry, --gpus."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from specdm_cli.config import Devices, VAETrainConfig, parse_devices
from specdm_cli.errors import Interrupted, UsageError
from specdm_cli.manifest import SPLITS
from specdm_cli.models.vae import SpecDMVAE
from specdm_cli.pipeline.devices import torch_devices, torch_threads
from specdm_cli.pipeline.runs.checkpoints import load_optimizer, save_optimizer
from specdm_cli.pipeline.runs.registry import newest_run, read_registry, record_run
from specdm_cli.pipeline.runs.vae_io import load_branches, save_vae
from specdm_cli.pipeline.signals import StopFlag
from specdm_cli.pipeline.train.fit_vae import FitVAERequest, fit_vae
from specdm_cli.pipeline.train.vae_trainer import VAETrainer, model_config
from specdm_cli.stores import open_store
from tests.conftest import PAPER_LOSS, manifest_of, prepare_demo, run_cli

TINY = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
        *PAPER_LOSS,
        "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--quiet")  # fmt: skip
TINY_CONFIG = {
    "image_block_out_channels": (8, 16, 16),
    "mask_block_out_channels": (8, 8, 16),
    "norm_num_groups": 4,
    "batch_size": 4,
    "lr": 1e-3,
}


def fit(store: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("fit-vae", store, "--run", run, *TINY, *extra)


def stage(run: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((run / "run.json").read_text())["stages"]["vae"]
    return loaded


def checkpoint_files(run: Path) -> dict[str, object]:
    """Every file of the run's latest checkpoint: bytes, or for configs the JSON less
    `_name_or_path` (diffusers records the folder a resumed model was loaded from)."""
    folder = run / str(stage(run)["checkpoint"])
    files: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name == "config.json":
            files[str(path.relative_to(folder))] = {
                k: v for k, v in json.loads(path.read_text()).items() if k != "_name_or_path"
            }
        else:
            files[str(path.relative_to(folder))] = path.read_bytes()
    return files


@pytest.mark.parametrize("single_stream", [False, True])
def test_save_then_load_is_bit_exact(
    demo_ss_store: Path, tmp_path: Path, single_stream: bool
) -> None:
    config = model_config(
        VAETrainConfig(single_stream=single_stream, **TINY_CONFIG),
        open_store(demo_ss_store).manifest,
    )
    torch.manual_seed(1)
    model = SpecDMVAE(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.square().sum() for p in model.parameters()).backward()  # type: ignore[union-attr]
    optimizer.step()
    save_vae(model, tmp_path)
    save_optimizer(optimizer, tmp_path)
    torch.manual_seed(2)
    loaded = SpecDMVAE(config)
    load_branches(loaded, tmp_path)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    restored = torch.optim.AdamW(loaded.parameters(), lr=5.0)
    load_optimizer(restored, tmp_path)
    assert restored.param_groups[0]["lr"] == 1e-3
    saved, back = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[i][k], back[i][k]) for i in saved for k in saved[i])
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))  # no pickles


def test_interrupt_checkpoints_and_resume_matches_an_uninterrupted_run(
    demo_ss_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = VAETrainConfig(steps=4, val_every=4, **TINY_CONFIG)
    stop = StopFlag()
    original = VAETrainer.step

    def signal_during_step_two(trainer: VAETrainer, step: int) -> dict[str, float]:
        if step == 1:
            stop.signum = signal.SIGTERM  # as if SIGTERM arrived while step 2 ran
        return original(trainer, step)

    with torch_threads(2):
        with monkeypatch.context() as patch, pytest.raises(Interrupted):
            patch.setattr(VAETrainer, "step", signal_during_step_two)
            fit_vae(FitVAERequest(demo_ss_store, tmp_path / "cut", config), stop,
                    warn=lambda line: None)  # fmt: skip
        assert stage(tmp_path / "cut")["step"] == 2 and not stage(tmp_path / "cut")["finished"]
        assert not read_registry()  # an interrupted run is not offered to later stages
        resumed = fit_vae(
            FitVAERequest(demo_ss_store, tmp_path / "cut", config, resume=True), StopFlag()
        )
        whole = fit_vae(FitVAERequest(demo_ss_store, tmp_path / "whole", config), StopFlag())
    assert resumed.state == "resumed" and resumed.validation == whole.validation
    assert checkpoint_files(tmp_path / "cut") == checkpoint_files(tmp_path / "whole")
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]


def test_a_signal_during_the_progress_update_still_checkpoints(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    config = VAETrainConfig(steps=4, **TINY_CONFIG)
    stop = StopFlag()

    def signal_during_progress(stage_name: str, done: int, total: int) -> None:
        if done == 1:
            stop.signum = signal.SIGINT

    with torch_threads(2), pytest.raises(Interrupted):
        fit_vae(FitVAERequest(demo_ss_store, tmp_path / "run", config), stop,
                signal_during_progress, warn=lambda line: None)  # fmt: skip
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert stage(tmp_path / "run")["step"] == len(logged)  # no step lost, none logged twice


def test_a_store_without_a_train_split_is_refused(demo_ss_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "no-train.zarr"
    shutil.copytree(demo_ss_store, store)
    split = zarr.open_group(str(store), mode="r+")["split"]
    assert isinstance(split, zarr.Array)
    codes = np.asarray(split[:])
    split[:] = np.where(codes == SPLITS.index("train"), SPLITS.index("val"), codes)
    manifest = manifest_of(store)
    manifest["normalization"] = None  # prepare computes it on train: none without train
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = fit(store, tmp_path / "run", "--steps", "1")
    assert code == 3 and "no 'train' samples" in stderr and "Traceback" not in stderr
    assert "--split " not in stderr and "--val-fraction/--test-fraction" in stderr
    code, _, stderr = fit(store, tmp_path / "run2", "--steps", "1", "--split", "val")
    assert code == 3 and "no normalisation statistics" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_run_folder_refusals(demo_ss_store: Path, demo_cd_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "1")[0] == 0
    code, _, stderr = fit(demo_cd_store, run, "--steps", "2", "--resume")
    assert code == 4 and "another store" in stderr
    code, _, stderr = fit(demo_ss_store, run, "--steps", "2", "--resume", "--overwrite")
    assert code == 2 and "exclude" in stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    code, _, stderr = fit(demo_ss_store, foreign, "--steps", "1", "--overwrite")
    assert code == 3 and (foreign / "thesis.tex").exists()
    assert fit(demo_ss_store, run, "--steps", "1", "--overwrite")[0] == 0


def test_limit_class_weights_and_validation_on_test(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "noval.zarr", "--val-fraction", "0", n=16, size=16)
    args = (*TINY[:-1], "--steps", "2", "--limit", "5", "--class-weights", "none", "--json")
    code, stdout, stderr = run_cli("fit-vae", store, "--run", tmp_path / "run", *args)
    assert code == 0, stderr
    assert "no val split; validating on test" in stderr
    details = stage(tmp_path / "run")["details"]
    assert isinstance(details, dict) and details["train_samples"] == 5
    validation = json.loads(stdout)["validation"]
    assert {"rmse", "rmse_physical", "sad", "ce", "iou", "miou"} <= validation.keys()
    classes = manifest_of(store)["classes"]
    assert isinstance(classes, list) and len(validation["iou"]) == len(classes)
    assert 0.0 <= validation["miou"] <= 1.0 and 0.0 <= validation["sad"] <= np.pi
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["normalization"] == manifest_of(store)["normalization"]
    assert newest_run("ss", can_sample=False) == (tmp_path / "run").resolve()
    assert newest_run("ss") is None  # a VAE alone cannot sample


def test_half_precision_is_fp32_on_the_cpu(demo_ss_store: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    told = {}
    for precision in ("fp32", "bf16"):
        code, stdout, stderr = fit(
            demo_ss_store, tmp_path / precision, "--steps", "1", "--precision", precision, "--json"
        )
        assert code == 0, stderr
        told[precision] = json.loads(stdout)["warnings"]
    # run.json records what was asked (a resume must match it): the user is told what ran.
    assert told == {
        "fp32": [],
        "bf16": ["warning: --precision bf16 applies on CUDA; the CPU trains in fp32"],
    }
    fp32, bf16 = (
        load_file(next((tmp_path / p).rglob("image/*.safetensors"))) for p in ("fp32", "bf16")
    )
    assert all(torch.equal(fp32[k], bf16[k]) for k in fp32)


def test_registry_finds_the_newest_run_per_task(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("ss-old", "cd", "ss-new", "ss-vae-only")}
    for path in runs.values():
        path.mkdir()
    record_run(runs["ss-old"], "ss", "diffusion", can_sample=True)
    record_run(runs["cd"], "cd", "diffusion", can_sample=True)
    record_run(runs["ss-new"], "ss", "diffusion", can_sample=True)
    record_run(runs["ss-vae-only"], "ss", "vae", can_sample=False)
    assert newest_run("ss") == runs["ss-new"].resolve()
    assert newest_run("cd") == runs["cd"].resolve()
    shutil.rmtree(runs["ss-new"])
    assert newest_run("ss") == runs["ss-old"].resolve()  # a deleted run is skipped
    entries = read_registry()
    assert {"run_id", "path", "task", "stage", "can_sample", "finished"} <= entries[0].keys()


def test_a_damaged_registry_is_told_not_read_as_empty(demo_ss_store: Path, tmp_path: Path) -> None:
    """Read as empty, `synthesize` without --model took the demo model instead of the user's
    runs and the next run's record erased every entry; a list with other items crashed."""
    registry = Path(os.environ["SPECDM_HOME"]) / "runs.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text('[{"path": "/x", "task": "ss"')
    code, _, stderr = run_cli("synthesize", "--task", "ss", "--n", "1", "--out", tmp_path / "s")
    assert code == 3 and "run registry" in stderr and str(registry) in stderr
    assert not (tmp_path / "s").exists()
    # Refused before training, not after it (the run is registered when it ends).
    code, _, stderr = fit(demo_ss_store, tmp_path / "run", "--steps", "1")
    assert code == 3 and "run registry" in stderr and not (tmp_path / "run").exists()
    registry.write_text('["x", 3, {"path": "/x", "task": "ss"}]')
    assert read_registry() == [{"path": "/x", "task": "ss"}]


def test_a_run_option_naming_a_file_is_told_so(demo_ss_store: Path, tmp_path: Path) -> None:
    """It was "run directory already exists" (pass --resume), or with --overwrite "not a
    specdm run" (a folder)."""
    named = tmp_path / "run.txt"
    named.write_text("notes")
    for extra in ((), ("--overwrite",), ("--resume",)):
        code, _, stderr = fit(demo_ss_store, named, "--steps", "1", *extra)
        assert code == 3 and "--run names a file, not a run folder" in stderr, stderr
    assert named.read_text() == "notes"


def test_the_same_command_registers_a_complete_run_its_registry_lacks(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    """Trained while the registry could not be written, the run was told "already complete"
    by every --resume after and never registered."""
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "1")[0] == 0
    registry = Path(os.environ["SPECDM_HOME"]) / "runs.json"
    registry.unlink()
    code, stdout, stderr = fit(demo_ss_store, run, "--steps", "1", "--resume", "--json")
    assert code == 0 and json.loads(stdout)["state"] == "already complete", stderr
    assert [entry["path"] for entry in read_registry()] == [str(run.resolve())]
    # An entry of a later stage is kept as it is.
    record_run(run, "ss", "diffusion", can_sample=True)
    assert fit(demo_ss_store, run, "--steps", "1", "--resume")[0] == 0
    assert newest_run("ss") == run.resolve()


@pytest.mark.parametrize("text", ["cpu:0", "cpu:x", "a,b", "", "cpu:²", "0,²"])  # "²".isdigit()
def test_bad_gpus_strings_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        parse_devices(text)


def test_gpus_strings() -> None:
    assert parse_devices(None) == Devices() == parse_devices("cpu")
    assert torch_devices(parse_devices(None)) == [torch.device("cpu")]
    assert torch_devices(parse_devices("cpu:3")) == [torch.device("cpu")] * 3
    two = parse_devices(" 0, 1")
    assert (two.kind, two.ranks, two.option()) == ("cuda", 2, "0,1")
    assert two.rank(1) == Devices("cuda", (1,))
    assert parse_devices(parse_devices("cpu:3").option()) == parse_devices("cpu:3")
    with pytest.raises(UsageError, match="cpu:2: benchmark runs on one device"):
        parse_devices("cpu:2").one("benchmark")


def test_reader_threads_do_not_change_the_weights(demo_ss_store: Path, tmp_path: Path) -> None:
    runs = {}
    for workers in (1, 3):
        config = VAETrainConfig(steps=2, workers=workers, **TINY_CONFIG)
        with torch_threads(2):
            fit_vae(FitVAERequest(demo_ss_store, tmp_path / f"w{workers}", config), StopFlag())
        runs[workers] = checkpoint_files(tmp_path / f"w{workers}")
    assert runs[1] == runs[3]


def test_warnings_reach_json_also_under_quiet(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "all-train.zarr", "--val-fraction", "0", "--test-fraction", "0")
    code, stdout, stderr = fit(store, tmp_path / "run", "--steps", "1", "--json")  # TINY: --quiet
    assert code == 0 and stderr == ""
    assert json.loads(stdout)["warnings"] == [
        "warning: the store has no val or test split; no validation"
    ]
    code, stdout, _ = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "1", "--json",
                              "--quiet", "--out", tmp_path / "s.zarr")  # fmt: skip
    assert code == 0 and any(w.startswith("model: ") for w in json.loads(stdout)["warnings"])


def test_a_store_prepared_again_resumes_the_run_another_store_is_refused(
    tmp_path: Path,
) -> None:
    store = prepare_demo(tmp_path / "ss.zarr", n=16, size=16)
    code, _, stderr = fit(store, tmp_path / "run", "--steps", "1")
    assert code == 0, stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["source_content_sha256"]
    # The same command again, as after the store was deleted: another manifest, the same data.
    again = prepare_demo(tmp_path / "again.zarr", n=16, size=16)
    manifest = manifest_of(again)
    manifest["provenance"]["created"] = "later"  # type: ignore[index]
    (again / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = fit(again, tmp_path / "run", "--steps", "2", "--resume")
    assert code == 0, stderr
    assert stage(tmp_path / "run")["step"] == 2
    other = prepare_demo(tmp_path / "other.zarr", "--seed", "5", n=16, size=16)
    code, _, stderr = fit(other, tmp_path / "run", "--steps", "3", "--resume")
    assert code == 4 and "cannot resume: the run was trained on another store" in stderr
