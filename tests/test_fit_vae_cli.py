"""`specdm fit-vae` end to end on tiny demo stores: run dirs, resume, refusals, learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdm_cli.fs.paths import file_sha256
from specdm_cli.pipeline.runs.registry import read_registry
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line
from tests.fixtures.geotiff_folder import make_geotiff_folder

TINY = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
        *PAPER_LOSS,
        "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--quiet")  # fmt: skip


def fit(store: Path, run: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli("fit-vae", store, "--run", run, *TINY, *extra)


def weights(run: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((run / "run.json").read_text())
    folder = run / manifest["stages"]["vae"]["checkpoint"]
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()})
    return tensors


def test_run_directory_contents(demo_ss_store: Path, tmp_path: Path) -> None:
    code, stdout, stderr = fit(
        demo_ss_store, tmp_path / "run", "--steps", "3", "--val-every", "3", "--json"
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["step"] == 3 and 0.0 <= summary["validation"]["miou"] <= 1.0
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    stage = manifest["stages"]["vae"]
    assert stage["finished"] and stage["details"]["latent_layout"] == [["image", 4], ["mask", 3]]
    assert {Path(p).name for p in stage["weights"]} == {
        "diffusion_pytorch_model.safetensors",
        "optimizer.safetensors",
    }
    for relative, digest in stage["weights"].items():
        assert file_sha256(tmp_path / "run" / relative) == digest
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert [e["path"] for e in read_registry()] == [str((tmp_path / "run").resolve())]


def test_the_last_line_gives_the_validation_figures(demo_ss_store: Path, tmp_path: Path) -> None:
    """It said `trained: RUN at step 20` only; fit-diffusion's gives its val loss."""
    run = tmp_path / "run"
    told = [arg for arg in TINY if arg != "--quiet"]
    code, stdout, stderr = run_cli("fit-vae", demo_ss_store, "--run", run, *told, "--steps", "2",
                                   "--val-every", "2", "--json")  # fmt: skip
    assert code == 0, stderr
    val = json.loads(stdout)["validation"]
    assert stderr.splitlines()[-1] == (
        f"trained: {run} at step 2 (val: RMSE {val['rmse']:.3f} normalised, "
        f"SAD {val['sad']:.3f} rad, mask mIoU {val['miou']:.3f})"
    )


@pytest.mark.parametrize("extra", [(), ("--single-stream",)])
def test_change_detection_and_single_stream_train(
    demo_cd_store: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    code, _stdout, stderr = fit(demo_cd_store, tmp_path / "run", "--steps", "2", "--json", *extra)
    assert code == 0, stderr
    layout = json.loads((tmp_path / "run" / "run.json").read_text())["stages"]["vae"]["details"][
        "latent_layout"
    ]
    expected = [["joint", 11]] if extra else [["image_t1", 4], ["image_t2", 4], ["change", 3]]
    assert layout == expected


def test_two_plus_two_steps_equal_four(demo_ss_store: Path, tmp_path: Path) -> None:
    assert fit(demo_ss_store, tmp_path / "whole", "--steps", "4")[0] == 0
    assert fit(demo_ss_store, tmp_path / "split", "--steps", "2")[0] == 0
    code, stdout, stderr = fit(
        demo_ss_store, tmp_path / "split", "--steps", "4", "--resume", "--json"
    )
    assert code == 0, stderr
    assert json.loads(stdout)["state"] == "resumed"
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    again = fit(demo_ss_store, tmp_path / "split", "--steps", "4", "--resume", "--json")
    assert again[0] == 0 and json.loads(again[1])["state"] == "already complete"


def test_loss_falls_on_a_demo_store(tmp_path: Path) -> None:
    store = prepare_demo(tmp_path / "d.zarr", n=32, size=16)
    # Last value wins: a larger batch and rate than TINY make the fall clear in 60 steps.
    code, _, stderr = run_cli("fit-vae", store, "--run", tmp_path / "run", *TINY, "--steps", "60",
                              "--val-every", "60", "--lr", "1e-2", "--batch-size", "8",
                              "--augment", "none")  # fmt: skip
    assert code == 0, stderr
    totals = [
        json.loads(line)["total"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert sum(totals[-8:]) / 8 < 0.8 * sum(totals[:8]) / 8


def test_refusals(demo_ss_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "2")[0] == 0
    code, _, stderr = fit(demo_ss_store, run, "--steps", "4", "--resume", "--sad-weight", "0")
    assert code == 4 and "--sad-weight: run 0.1, now 0.0" in stderr
    code, _, stderr = fit(demo_ss_store, run, "--steps", "4")
    assert code == 3 and "already exists" in stderr
    weights_file = next(run.rglob("image/diffusion_pytorch_model.safetensors"))
    weights_file.write_bytes(weights_file.read_bytes()[:-8] + b"tampered")
    code, _, stderr = fit(demo_ss_store, run, "--steps", "4", "--resume")
    assert code == 4 and "tampered" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("--batch-size", "0"), 2, "--batch-size"),
        (("--downsample", "3"), 2, "--downsample"),
        (("--split", "synthetic"), 3, "no 'synthetic' samples"),
        (("--gpus", "0"), 5, "CUDA"),
        (("--image-blocks", "8,8"), 2, "bad VAE shape: image_block_out_channels=(8, 8) gives f=2"),
        (("--norm-groups", "3"), 2, "norm_num_groups=3 must divide"),
        (("--mask-blocks", "8,0,8"), 2, "--mask-blocks '8,0,8' is not a comma-separated list"),
    ],
)
def test_bad_options(
    demo_ss_store: Path, tmp_path: Path, args: tuple[str, ...], code: int, words: str
) -> None:
    if args[0] == "--gpus" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    exit_code, _, stderr = fit(demo_ss_store, tmp_path / "run", "--steps", "1", *args)
    assert exit_code == code, stderr
    assert words in stderr and "Traceback" not in stderr
    if code == 2:  # told before anything is written
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # two spawned processes each import torch and diffusers: about 20-30 s
def test_two_cpu_ranks_train_with_gloo_and_checkpoint_once(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    code, _stdout, stderr = fit(
        demo_ss_store, tmp_path / "run", "--steps", "2", "--gpus", "cpu:2", "--json"
    )
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    stage = manifest["stages"]["vae"]
    assert (
        stage["finished"]
        and stage["step"] == 2
        and stage["checkpoint"] == "checkpoints/vae-0000002"
    )
    assert (
        len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    )  # rank 0 alone writes
    code, _, stderr = fit(demo_ss_store, tmp_path / "odd", "--steps", "1", "--gpus", "cpu:3")
    assert code == 2 and "multiple" in stderr


def test_a_resume_with_steps_at_or_below_the_step_reached_is_refused(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    """It trained nothing, said "resumed" (exit 0) and left the VAE unfinished."""
    run = tmp_path / "run"
    assert fit(demo_ss_store, run, "--steps", "2")[0] == 0
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["vae"]["finished"] = False  # as a run stopped at step 2 of 4
    (run / "run.json").write_text(json.dumps(manifest))
    code, _, stderr = fit(demo_ss_store, run, "--steps", "1", "--resume")
    assert code == 2 and "--steps 1 is not above the step the run's VAE reached (2)" in stderr
    assert fit(demo_ss_store, run, "--steps", "3", "--resume")[0] == 0


def test_a_limit_above_the_split_is_warned_of(demo_ss_store: Path, tmp_path: Path) -> None:
    """`--limit 100` on a store of fewer train pairs trained on them all without a word: the
    limited-data protocol asked for was not the one run."""
    train = json.loads((demo_ss_store / "manifest.json").read_text())["split_counts"]["train"]
    code, stdout, stderr = run_cli("fit-vae", demo_ss_store, "--run", tmp_path / "run",
                                   *TINY[:-1], "--steps", "1", "--limit", "1000", "--json")  # fmt: skip
    assert code == 0, stderr
    words = f"--limit 1000 is above the {train} 'train' samples of the store: fit-vae trains on all"
    assert [w for w in json.loads(stdout)["warnings"] if words in w], stdout
    assert words in stderr
    code, stdout, stderr = fit(demo_ss_store, tmp_path / "cut", "--steps", "1", "--limit", "2",
                               "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["warnings"] == [], stdout


def test_a_store_without_train_gets_a_prepare_fix_not_split(tmp_path: Path) -> None:
    """Without a train split fit-vae said "prepare a train split or pass --split", and --split
    val then failed with "no normalisation statistics ...: re-run prepare": a dead end. The
    statistics are the train split's, so both say how to prepare a train split now."""
    raw = make_geotiff_folder(tmp_path / "raw", n=2, size=(16, 16))
    splits = tmp_path / "splits.csv"
    splits.write_text("stem,split\ntile_00,val\ntile_01,val\n", encoding="utf-8")
    store = tmp_path / "val.zarr"
    code, _, stderr = run_cli("prepare", "geotiff", raw, "--out", store, "--splits", splits, "-q")
    assert code == 0, stderr
    fix = f"prepare it again with --overwrite and a --splits file that names some files train ({splits} names none)"
    for split in ((), ("--split", "val")):
        code, _, stderr = fit(store, tmp_path / "run", "--steps", "1", *split)
        assert_one_error_line(code, stderr, 3, "no 'train' samples, so no normalisation statistics")
        assert fix in stderr and "--split " not in stderr and not (tmp_path / "run").exists()
    # A split the store lacks, beside a train split, is told which splits it holds.
    held = prepare_demo(tmp_path / "held.zarr", "--test-fraction", "0", n=8, size=16)
    code, _, stderr = fit(held, tmp_path / "run", "--steps", "1", "--split", "test")
    assert_one_error_line(code, stderr, 3, "the store has no 'test' samples")
    assert "pass --split with a split it holds: train (" in stderr
