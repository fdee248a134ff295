"""`specdm synthesize` end to end: stores, determinism across shards and resume, model choice."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from specdm_cli.manifest import load_manifest
from specdm_cli.stores.dataset import StoreDataset
from tests import processes
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli

VAE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
       *PAPER_LOSS,
       "--batch-size", "8", "--lr", "1e-2", "--threads", "2", "--quiet", "--steps", "8")  # fmt: skip
UNET = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8", "--layers-per-block", "1",
        "--batch-size", "8", "--lr", "1e-3", "--threads", "2", "--quiet", "--steps", "4")  # fmt: skip
FAST = ("--steps", "4", "--batch-size", "4", "--threads", "2", "--quiet")


def train_run(root: Path, task: str) -> Path:
    store = prepare_demo(root / f"{task}.zarr", n=24, size=16, task=task)
    run = root / f"run-{task}"
    for command in (("fit-vae", store, "--run", run, *VAE), ("fit-diffusion", run, *UNET)):
        code, _, stderr = run_cli(*command)
        assert code == 0, stderr
    return run


@pytest.fixture(scope="module")
def ss_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("ss"), "ss")


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(a[:]) for name, a in zarr.open_group(store, mode="r").arrays()}


def synth(run: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("synthesize", "--model", run, "--out", out, *FAST, *extra)


def test_synthetic_store_is_a_store(ss_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "syn.zarr"
    code, stdout, stderr = synth(
        ss_run, out, "--n", "10", "--json", "--preview", str(tmp_path / "p.png")
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["complete"] and summary["written"] == 10
    # Three batches went through the writer: it was busy, and never longer than the whole call.
    assert 0 < summary["write_seconds"] <= summary["seconds"]
    assert 0 <= summary["write_wait_seconds"] <= summary["seconds"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_counts"] == {"synthetic": 10} and manifest["model"]["sampler"] == "dpmpp"
    assert manifest["batch_grid"] == 4 and manifest["model"]["steps"] == 4
    data = arrays(out)
    assert data["image"].shape == (10, 10, 16, 16) and data["image"].dtype == np.uint16
    assert data["mask"].max() < len(manifest["classes"])
    assert run_cli("inspect", out)[0] == 0
    assert len(StoreDataset(out)) == 10
    assert xr.open_zarr(out, consolidated=False)["image"].sizes["sample"] == 10
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_samples_of_a_run_open_in_xarray_in_its_training_store_s_units(
    ss_run: Path, tmp_path: Path
) -> None:
    """A run trained on demo scenes (reflectance x 10000) gave samples that xarray showed as raw
    integers, 10,000 times its training store's reflectance: only the shipped demo models'
    samples carried the scale."""
    out = tmp_path / "syn.zarr"
    assert synth(ss_run, out, "--n", "4")[0] == 0
    manifest = load_manifest(out / "manifest.json")
    assert manifest.model is not None and manifest.model.kind != "demo"
    assert manifest.model.details["source_dataset"] == "demo"
    image = xr.open_zarr(out)["image"]
    raw = xr.open_zarr(out, mask_and_scale=False)["image"]
    assert image.attrs["units"] == "1" and raw.attrs["scale_factor"] == 1e-4
    np.testing.assert_allclose(image[0].values, raw[0].values * 1e-4)


def test_same_seed_same_bytes_other_seed_other_bytes(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "a.zarr", "--n", "6")[0] == 0
    assert synth(ss_run, tmp_path / "b.zarr", "--n", "6")[0] == 0
    assert synth(ss_run, tmp_path / "c.zarr", "--n", "6", "--seed", "1")[0] == 0
    a, b, c = arrays(tmp_path / "a.zarr"), arrays(tmp_path / "b.zarr"), arrays(tmp_path / "c.zarr")
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["image"], c["image"])


def test_shards_merge_into_the_single_run_bytes(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "whole.zarr", "--n", "11")[0] == 0
    shards = tmp_path / "shards.zarr"
    code, stdout, _ = synth(ss_run, shards, "--n", "11", "--shard", "1/3", "--json")
    assert code == 0 and json.loads(stdout)["complete"] is False
    code, _, stderr = run_cli("synthesize", "--finalize", shards)
    assert code == 3 and "not written yet" in stderr
    # What --finalize cannot mean: options it ignored, no store, a store no shards wrote.
    code, _, stderr = run_cli("synthesize", "--finalize", shards, "--n", "5", "--out", tmp_path)
    assert code == 2 and "takes no --out or --n" in stderr
    code, _, stderr = run_cli("synthesize", "--finalize", tmp_path / "none.zarr")
    assert code == 3 and "no store to finalize" in stderr
    real = prepare_demo(tmp_path / "real.zarr", n=4, size=16)
    code, _, stderr = run_cli("synthesize", "--finalize", real)
    assert code == 2 and "not a store that synthesize wrote" in stderr
    assert synth(ss_run, shards, "--n", "11", "--shard", "0/3")[0] == 0
    code, stdout, _ = synth(ss_run, shards, "--n", "11", "--shard", "2/3", "--json")
    assert code == 0 and json.loads(stdout)["complete"] is True
    whole, merged = arrays(tmp_path / "whole.zarr"), arrays(shards)
    for name in ("image", "mask", "written", "class_fraction"):
        np.testing.assert_array_equal(whole[name], merged[name], err_msg=name)


def test_a_killed_run_resumes_to_the_same_bytes(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "whole.zarr", "--n", "12")[0] == 0
    out = tmp_path / "killed.zarr"
    command = [
        sys.executable,
        "-m",
        "specdm_cli",
        "synthesize",
        "--model",
        str(ss_run),
        "--out",
        str(out),
        "--n",
        "12",
        *FAST,
    ]
    killed = processes.run(
        command, env={**os.environ, "SPECDM_FAULT": "synthesize.after_batch:2"}, text=True
    )
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    assert int(np.asarray(zarr.open_group(out, mode="r")["written"][:]).sum()) == 8
    resumed = processes.run([*command, "--resume"], text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, again = arrays(tmp_path / "whole.zarr"), arrays(out)
    for name in ("image", "mask", "written"):
        np.testing.assert_array_equal(whole[name], again[name], err_msg=name)


def test_another_plan_cannot_join_a_store(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "s.zarr", "--n", "4")[0] == 0
    code, _, stderr = synth(ss_run, tmp_path / "s.zarr", "--n", "4", "--seed", "3")
    assert code == 3 and "another synthesis plan" in stderr


def test_geotiff_output(ss_run: Path, tmp_path: Path) -> None:
    code, _, stderr = synth(ss_run, tmp_path / "tiles", "--n", "5", "--format", "geotiff")
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "tiles" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["files"]) == 5
    assert (tmp_path / "tiles" / "masks" / "000004.tif").is_file()


def test_default_model_is_the_newest_registered_run(
    ss_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specdm_cli.pipeline.runs.registry import record_run

    record_run(ss_run, "ss", "diffusion", can_sample=True)
    code, stdout, stderr = run_cli(
        "synthesize", "--task", "ss", "--n", "4", "--out", tmp_path / "d.zarr", *FAST, "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["model_kind"] == "registry"
    code, _, stderr = run_cli(
        "synthesize",
        "--task",
        "cd",
        "--n",
        "4",
        "--out",
        tmp_path / "e.zarr",
        "--model",
        str(ss_run),
        *FAST,
    )
    assert code == 2 and "task ss" in stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--n", "0"), 2),
        (("--n", "3", "--shard", "3/2"), 2),
        (("--n", "3", "--batch-size", "0"), 2),
        (("--n", "3", "--task", "xx"), 2),
        (("--n", "3", "--batch-size", "many"), 2),
    ],
)
def test_bad_options(ss_run: Path, tmp_path: Path, args: tuple[str, ...], code: int) -> None:
    exit_code, _, stderr = run_cli(
        "synthesize", "--model", ss_run, "--out", tmp_path / "x.zarr", *args
    )
    assert exit_code == code and stderr.startswith("error:") and "Traceback" not in stderr


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1001), ("ddim", 1000), ("dpmpp", 1000)])
def test_more_steps_than_the_schedule_has_are_refused_before_any_output(
    ss_run: Path, tmp_path: Path, sampler: str, steps: int
) -> None:
    """dpmpp at 1,000 steps divided by a zero sigma and wrote all-zero images into a store
    marked complete; ddim and ddpm past the schedule crashed as "a bug"."""
    out = tmp_path / "x.zarr"
    code, _, stderr = run_cli("synthesize", "--model", ss_run, "--out", out, "--n", "1",
                              "--sampler", sampler, "--steps", str(steps))  # fmt: skip
    assert code == 2 and f"--steps {steps}: {sampler} takes at most" in stderr
    assert not out.exists()


def test_non_finite_decoded_values_are_a_model_error_not_zeros() -> None:
    from specdm_cli.errors import ModelError
    from specdm_cli.pipeline.synthesize.sampler import to_dtype

    values = np.array([[1.0, 2.0], [np.nan, 3.0]], dtype=np.float32)
    for dtype in (np.uint16, np.float32):
        with pytest.raises(ModelError, match="NaN or inf"):
            to_dtype(values, np.dtype(dtype))
    stored, clipped = to_dtype(np.array([[1.4, 70000.0]]), np.dtype(np.uint16))
    assert stored.tolist() == [[1, 65535]] and clipped.tolist() == [1]


def test_bands_never_negative_in_real_train_data_are_never_negative_in_samples() -> None:
    """A float reflectance store got samples down to -0.054 (an unsigned store clips at 0 by
    its dtype); a band whose real values go negative keeps its negative samples."""
    from specdm_cli.pipeline.synthesize.sampler import band_floor, to_dtype

    floor = band_floor([0.0, -0.2])  # train minima: band 0 reflectance, band 1 a difference
    values = np.array([[[-0.054, 0.3]], [[-0.1, 0.2]]])[None].repeat(2, axis=0)  # (N, C, 1, 2)
    for dtype in (np.float32, np.int16):
        stored, clipped = to_dtype(values * 1000, np.dtype(dtype), floor)
        assert stored[:, 0].min() == 0 and stored[:, 1].min() < 0, dtype
        assert clipped.tolist() == [1, 1]


def test_a_tampered_model_is_refused(ss_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ss_run, run)
    weights = next(run.rglob("unet/diffusion_pytorch_model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"evil")
    code, _, stderr = synth(run, tmp_path / "x.zarr", "--n", "2")
    assert code == 4 and "tampered" in stderr


def test_the_latent_shift_is_undone_before_decoding(ss_run: Path, tmp_path: Path) -> None:
    """Samples are decoded at latent / scale + shift; runs from before the shift decode at 0."""
    import shutil

    decoded = {}
    for variant in ("trained", "zero", "absent"):
        run = shutil.copytree(ss_run, tmp_path / variant)
        manifest = json.loads((run / "run.json").read_text())
        details = manifest["stages"]["diffusion"]["details"]
        if variant == "zero":
            details["latent_shift"] = [0.0] * len(details["latent_scale"])
        if variant == "absent":
            del details["latent_shift"]
        (run / "run.json").write_text(json.dumps(manifest))
        assert synth(run, tmp_path / f"{variant}.zarr", "--n", "4")[0] == 0
        decoded[variant] = arrays(tmp_path / f"{variant}.zarr")["image"]
    assert np.array_equal(decoded["zero"], decoded["absent"])
    assert not np.array_equal(decoded["trained"], decoded["zero"])


def test_require_keeps_the_accepted_draws_in_order(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "plain.zarr", "--n", "24")[0] == 0
    plain = arrays(tmp_path / "plain.zarr")
    fractions = plain["class_fraction"]
    wanted = int(np.argmax((fractions > 0).sum(axis=0) * (fractions.std(axis=0) > 0)))
    threshold = float(np.sort(fractions[:, wanted])[::-1][4])
    assert 0 < threshold < 1
    require = ("--n", "4", "--require", f"{wanted}:{threshold}", "--json")
    code, stdout, stderr = synth(ss_run, tmp_path / "kept.zarr", *require)
    assert code == 0, stderr
    kept = arrays(tmp_path / "kept.zarr")
    drawn = kept["candidate"]
    assert np.all(np.diff(drawn) > 0) and json.loads(stdout)["draws"] >= drawn[-1] + 1
    qualifying = np.flatnonzero(fractions[:, wanted] >= threshold)
    np.testing.assert_array_equal(drawn, qualifying[:4])
    for name in ("image", "mask", "class_fraction"):
        np.testing.assert_array_equal(kept[name], plain[name][drawn], err_msg=name)
    manifest = json.loads((tmp_path / "kept.zarr" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["plan"]["require"]
    np.testing.assert_array_equal(plain["candidate"], np.arange(24))


def test_require_resumes_after_a_kill(ss_run: Path, tmp_path: Path) -> None:
    classes = json.loads((ss_run / "run.json").read_text())["classes"]
    wanted = f"{classes[0]['name']}:0.01"
    options = ["--n", "8", "--require", wanted]
    assert synth(ss_run, tmp_path / "whole.zarr", *options)[0] == 0
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "specdm_cli", "synthesize", "--model", str(ss_run),
               "--out", str(out), *FAST, *options]  # fmt: skip
    environment = {**os.environ, "SPECDM_FAULT": "synthesize.after_batch:1"}
    killed = processes.run(command, env=environment)
    assert killed.returncode == -signal.SIGKILL
    resumed = processes.run(command, text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, again = arrays(tmp_path / "whole.zarr"), arrays(out)
    for name in ("image", "mask", "candidate"):
        np.testing.assert_array_equal(whole[name], again[name], err_msg=name)


@pytest.mark.parametrize(
    ("require", "message"),
    [
        ("nosuchclass:0.1", "no class"),
        ("water", "'water': expected CLASS:FRACTION"),
        ("0:1.5", "in (0, 1]"),
        ("0:0.1 --shard 0/2", "cannot be split"),
        ("0:1", "draws qualified"),
    ],
)
def test_require_refusals(ss_run: Path, tmp_path: Path, require: str, message: str) -> None:
    spec, *extra = require.split()
    code, _, stderr = synth(ss_run, tmp_path / "r.zarr", "--n", "1", "--require", spec, *extra)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r.zarr").exists()  # nothing drawn: no empty store left behind


def test_a_missing_model_is_exit_4(tmp_path: Path) -> None:
    code, _, stderr = run_cli("synthesize", "--model", tmp_path / "nothing", "--n", "2",
                              "--out", tmp_path / "x.zarr")  # fmt: skip
    assert code == 4 and "no such run folder" in stderr and not (tmp_path / "x.zarr").exists()
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli("synthesize", "--model", tmp_path / "empty", "--n", "2",
                              "--out", tmp_path / "x.zarr")  # fmt: skip
    assert code == 4 and "not a run directory: no run.json" in stderr


def test_half_precision_asked_on_the_cpu_is_said_and_recorded_as_what_ran(tmp_path: Path) -> None:
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "2",
                              "--precision", "bf16", "--out", tmp_path / "x.zarr")  # fmt: skip
    assert code == 0 and "--precision bf16 applies on CUDA; the CPU samples in fp32" in stderr
    assert load_manifest(tmp_path / "x.zarr" / "manifest.json").model.precision == "fp32"


def test_half_precision_asked_of_the_pipeline_on_the_cpu_is_recorded_as_what_ran(
    tmp_path: Path,
) -> None:
    """A Python caller of `synthesize_store` (not only the CLI) gets the CPU's fp32 rule."""
    from specdm_cli.pipeline.signals import StopFlag
    from specdm_cli.pipeline.synthesize.command import SynthesizeOptions, synthesize_store

    told: list[str] = []
    options = SynthesizeOptions(out=tmp_path / "x.zarr", n=2, model="demo", task="ss",
                                steps=2, precision="bf16", detail=False)  # fmt: skip
    synthesize_store(options, StopFlag(), None, told.append)
    assert "warning: --precision bf16 applies on CUDA; the CPU samples in fp32" in told
    manifest = load_manifest(tmp_path / "x.zarr" / "manifest.json")
    assert manifest.model is not None and manifest.model.precision == "fp32"
    assert manifest.plan["precision"] == "fp32"


def test_a_complete_store_made_again_is_already_complete_with_no_rate(tmp_path: Path) -> None:
    """The same command again wrote nothing but said "complete: ... 0.0 pairs/s"."""
    command = ("synthesize", "--model", "demo", "--task", "ss", "--n", "2", "--steps", "2",
               "--no-detail", "--out", tmp_path / "x.zarr")  # fmt: skip
    code, _, stderr = run_cli(*command)
    assert code == 0 and "complete: " in stderr and "pairs/s" in stderr, stderr
    assert "preview" not in stderr
    code, stdout, stderr = run_cli(*command, "--json")
    assert code == 0, stderr
    assert stderr.splitlines()[-1] == f"already complete: {tmp_path / 'x.zarr'}: 2/2 pairs"
    assert json.loads(stdout)["already_complete"] is True
    # The summary line says where --preview put its picture (it said nothing of it).
    png = tmp_path / "x.png"
    code, stdout, stderr = run_cli(*command, "--preview", png, "--json")
    assert code == 0 and stderr.splitlines()[-1].endswith(f"2/2 pairs; preview {png}"), stderr
    assert json.loads(stdout)["preview"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_what_a_newcomer_gets_wrong_is_told_as_it_is(tmp_path: Path) -> None:
    out = ("--n", "2", "--out", tmp_path / "x.zarr")
    code, _, stderr = run_cli("synthesize", "--model", "demo", *out)
    assert code == 2 and "--model demo holds an ss and a cd model, --task is needed" in stderr
    code, _, stderr = run_cli(
        "synthesize", "--model", "demo", "--task", "ss", "--masks", tmp_path / "none.zarr", *out
    )  # the path first, before what the demo model can do with masks
    assert code == 3 and "--masks: store does not exist" in stderr
    (tmp_path / "tile.tif").write_bytes(b"II*\x00")
    code, _, stderr = run_cli("inspect", tmp_path / "tile.tif")
    assert code == 3 and "not a store: a store is a folder" in stderr
    code, _, stderr = run_cli("distill", "demo")  # the shipped models are not run folders here
    assert code == 4 and "shipped demo models are read-only" in stderr
    assert "copy the package's specdm_cli/assets/demo-ss" in stderr
    assert not (tmp_path / "x.zarr").exists()


def test_batch_size_1_and_4_agree_within_tolerance(ss_run: Path, tmp_path: Path) -> None:
    assert synth(ss_run, tmp_path / "b4.zarr", "--n", "4")[0] == 0
    assert synth(ss_run, tmp_path / "b1.zarr", "--n", "4", "--batch-size", "1")[0] == 0
    four, one = arrays(tmp_path / "b4.zarr"), arrays(tmp_path / "b1.zarr")
    # Reflectance x 10000 in uint16: batched float kernels may round differently by a unit.
    difference = np.abs(four["image"].astype(np.int64) - one["image"].astype(np.int64))
    assert difference.max() <= 2
    assert (four["mask"] == one["mask"]).mean() >= 0.99


def test_a_hyperspectral_chain_on_tiny_tiles(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "hsi.zarr", "--demo-bands", "hsi", n=16, size=8)
    bands = len(json.loads((store / "manifest.json").read_text())["bands"])
    assert bands >= 100
    run = tmp_path / "run"
    assert run_cli("fit-vae", store, "--run", run, *VAE)[0] == 0
    code, _, stderr = run_cli("fit-diffusion", run, *UNET, "--unet-blocks", "16,32,32")
    assert code == 2 and "divisible by 4, not 2" in stderr  # a 2x2 latent halves once only
    code, _, stderr = run_cli("fit-diffusion", run, *UNET)
    assert code == 0, stderr
    out = tmp_path / "syn.zarr"
    code, _, stderr = synth(run, out, "--n", "2")
    assert code == 0, stderr
    code, stdout, stderr = run_cli("inspect", out, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["complete"] and summary["written"] == 2 and len(summary["bands"]) == bands
    assert arrays(out)["image"].shape == (2, bands, 8, 8)


def test_batch_size_auto_joins_the_stores_grid(ss_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.zarr"
    assert synth(ss_run, out, "--n", "6", "--batch-size", "2", "--shard", "0/2")[0] == 0
    code, stdout, stderr = run_cli("synthesize", "--model", ss_run, "--out", out, "--n", "6",
                                   "--steps", "4", "--shard", "1/2", "--json", "--quiet")  # fmt: skip
    assert code == 0 and json.loads(stdout)["complete"], stderr
    assert json.loads((out / "manifest.json").read_text())["batch_grid"] == 2


def test_the_grid_is_at_most_n_unless_draws_are_filtered(ss_run: Path, tmp_path: Path) -> None:
    # A batch always computes B samples: --n 3 under the CPU default (16) or --batch-size 512
    # would sample 16 or 512 to keep 3. With --require the draws go past n, in blocks of B.
    def grid(name: str, *extra: str) -> int:
        code, stdout, stderr = synth(
            ss_run, tmp_path / f"{name}.zarr", "--n", "3", "--json", *extra
        )
        assert code == 0 and json.loads(stdout)["written"] == 3, stderr
        return int(
            json.loads((tmp_path / f"{name}.zarr" / "manifest.json").read_text())["batch_grid"]
        )

    assert grid("auto", "--batch-size", "auto") == 3 and grid("large", "--batch-size", "512") == 3
    auto, large = arrays(tmp_path / "auto.zarr"), arrays(tmp_path / "large.zarr")
    np.testing.assert_array_equal(auto["image"], large["image"])
    fractions = auto["class_fraction"]
    common = int(np.argmax(fractions.min(axis=0)))  # present in every sample drawn so far
    bar = f"{common}:{fractions[:, common].min() / 2:.6f}"
    assert grid("require", "--batch-size", "5", "--require", bar) == 5


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 20-30 s
def test_two_cpu_ranks_write_the_single_run_bytes(ss_run: Path, tmp_path: Path) -> None:
    # Each of 2 ranks gets half of --threads 2: the single run uses the same 1 thread.
    assert synth(ss_run, tmp_path / "one.zarr", "--n", "10", "--threads", "1")[0] == 0
    code, stdout, stderr = synth(ss_run, tmp_path / "two.zarr", "--n", "10", "--gpus", "cpu:2",
                                 "--json")  # fmt: skip
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["complete"] and summary["written"] == 10
    one, two = arrays(tmp_path / "one.zarr"), arrays(tmp_path / "two.zarr")
    for name in ("image", "mask", "written", "candidate", "class_fraction"):
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    code, _, stderr = synth(ss_run, tmp_path / "r.zarr", "--n", "2", "--gpus", "cpu:2",
                            "--require", "0:0.1")  # fmt: skip
    assert code == 2 and "cannot be split" in stderr


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 20-30 s
def test_cpu_ranks_show_the_progress_end_once(tmp_path: Path) -> None:
    """The parent polls the ranks twice a second till they exit: `synthesize 4/4 (100%)` came
    once per poll (four times). It counts pairs (8), as the summary's rate does, not batches."""
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "8",
                              "--batch-size", "2", "--steps", "2", "--no-detail", "--gpus",
                              "cpu:2", "--threads", "2", "--out", tmp_path / "two.zarr")  # fmt: skip
    assert code == 0, stderr
    ends = [line for line in stderr.splitlines() if line.startswith("synthesize 8/8")]
    assert len(ends) == 1, stderr


def test_progress_counts_pairs_not_batches(tmp_path: Path) -> None:
    """`synthesize 2/2 (100%), 0.5/s` counted batches of 2 while the summary gave pairs/s."""
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "3",
                              "--batch-size", "2", "--steps", "2", "--no-detail", "--threads",
                              "1", "--out", tmp_path / "p.zarr")  # fmt: skip
    assert code == 0, stderr
    assert any(line.startswith("synthesize 3/3 (100%)") for line in stderr.splitlines()), stderr


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 20-30 s
def test_cpu_ranks_without_batch_size_use_the_cpu_default_grid(
    ss_run: Path, tmp_path: Path
) -> None:
    # --gpus is parsed once for every command: B auto with cpu:2 is the CPU default (16), not a
    # "this command runs on one device" refusal.
    common = ("synthesize", "--model", ss_run, "--n", "20", "--steps", "4", "--quiet", "--json")
    code, _, stderr = run_cli(*common, "--out", tmp_path / "one.zarr", "--threads", "1")
    assert code == 0, stderr
    code, stdout, stderr = run_cli(
        *common, "--out", tmp_path / "two.zarr", "--gpus", "cpu:2", "--threads", "2"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["written"] == 20
    assert json.loads((tmp_path / "two.zarr" / "manifest.json").read_text())["batch_grid"] == 16
    one, two = arrays(tmp_path / "one.zarr"), arrays(tmp_path / "two.zarr")
    for name in ("image", "mask", "written", "class_fraction"):
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)


def test_the_plan_records_cpu_threads_and_a_resume_with_others_is_refused(
    ss_run: Path, tmp_path: Path
) -> None:
    # CPU kernels sum floats in thread-dependent order: the last bit of a decoded value, and so
    # the bytes of a store, depend on the thread count; a resume must not mix two of them.
    out = tmp_path / "t.zarr"
    assert synth(ss_run, out, "--n", "4", "--threads", "1")[0] == 0
    assert json.loads((out / "manifest.json").read_text())["plan"]["threads"] == 1
    code, _, stderr = synth(ss_run, out, "--n", "4", "--threads", "2", "--resume")
    assert code == 3 and "--threads: store 1, now 2" in stderr
    assert synth(ss_run, out, "--n", "4", "--threads", "1", "--resume")[0] == 0


def test_a_require_by_raw_code_is_pointed_at_the_class_index() -> None:
    """A user who knows road as code 7 read "no class '7'" and the names, nothing more."""
    from specdm_cli.errors import UsageError
    from specdm_cli.manifest import ClassInfo
    from specdm_cli.pipeline.synthesize.require import parse_require

    classes = [
        ClassInfo(index=i, name=name, colour=(0, 0, 0), code=code)
        for i, (name, code) in enumerate([("background", 0), ("water", 3), ("road", 7)])
    ]
    with pytest.raises(UsageError, match="no class '7' \\(a name or an index\\)") as info:
        parse_require("7:0.05", classes)
    assert info.value.hint == "classes: 0 background, 1 water (code 3), 2 road (code 7)"
    assert parse_require("2:0.05", classes)[0].name == "road"


def test_label_confidence_unlabels_the_decoders_unsure_pixels() -> None:
    """The rule on logits whose probabilities are known: a 50/50 pixel is unlabelled at 0.6 and
    kept at 0.4; a sure pixel is kept; 0 labels every pixel."""
    import torch

    from specdm_cli.pipeline.synthesize.sampler import confident_labels

    even, sure = [0.0, 0.0], [0.0, 10.0]  # p = 0.5 / 0.5; p(class 1) > 0.99
    logits = torch.tensor([even, sure]).T.reshape(1, 2, 1, 2)
    labels = {
        p: confident_labels(logits.argmax(dim=1), logits, p).tolist() for p in (0.0, 0.4, 0.6)
    }
    assert labels[0.0] == labels[0.4] == [[[0, 1]]]
    assert labels[0.6] == [[[255, 1]]]


def test_label_confidence_unlabels_pixels_and_nothing_else(ss_run: Path, tmp_path: Path) -> None:
    runs = {p: tmp_path / f"p{p}.zarr" for p in ("0", "0.3", "0.5")}
    for p, out in runs.items():
        code, _, stderr = synth(ss_run, out, "--n", "6", "--label-confidence", p)
        assert code == 0, stderr
    plain, low, high = (arrays(out) for out in runs.values())
    np.testing.assert_array_equal(plain["image"], high["image"])
    assert (plain["mask"] != 255).all()
    unsure_low, unsure_high = low["mask"] == 255, high["mask"] == 255
    assert unsure_high.any() and (unsure_high >= unsure_low).all()  # a higher bar: a superset
    np.testing.assert_array_equal(high["mask"][~unsure_high], plain["mask"][~unsure_high])
    manifest = load_manifest(runs["0.5"] / "manifest.json")
    assert manifest.plan["label_confidence"] == 0.5
    assert "label_confidence" not in load_manifest(runs["0"] / "manifest.json").plan
    code, _, stderr = synth(ss_run, runs["0.5"], "--n", "6", "--label-confidence", "0.3")
    assert code == 3 and "another synthesis plan" in stderr


@pytest.mark.parametrize("bar", ["1", "-0.1", "nan"])
def test_a_label_confidence_outside_0_1_is_refused(ss_run: Path, tmp_path: Path, bar: str) -> None:
    code, _, stderr = synth(ss_run, tmp_path / "x.zarr", "--n", "2", "--label-confidence", bar)
    assert code == 2 and "--label-confidence" in stderr and not (tmp_path / "x.zarr").exists()
