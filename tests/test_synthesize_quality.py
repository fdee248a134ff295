"""`synthesize --min-quality Q --real STORE`: the samples `benchmark --write-scores` + `filter`
would keep, found in one pass, with their scores in the store, resumable."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import processes
from tests.conftest import manifest_of, prepare_demo, run_cli
from tests.test_synthesize import FAST, arrays, synth, train_run

JUDGE = ("--feature-steps", "5")


@pytest.fixture(scope="module")
def ss_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run(tmp_path_factory.mktemp("quality"), "ss")


def real_store(run: Path) -> Path:
    return run.parent / "ss.zarr"  # the store train_run fitted the run on


def scores_of_plain_draws(run: Path, out: Path, n: int) -> np.ndarray:
    """The benchmark's scores of draws 0..n-1 (a plain store scored by --write-scores)."""
    assert synth(run, out, "--n", str(n))[0] == 0
    code, _, stderr = run_cli("benchmark", "--real", real_store(run), "--synthetic", out,
                              "--write-scores", "--out", out.parent / "report", *JUDGE)  # fmt: skip
    assert code == 0, stderr
    return np.asarray(arrays(out)["quality"], np.float64)


def bar_between(scores: np.ndarray) -> float:
    """A bar half-way between two neighbouring scores near the median, so that float noise
    between a batch of 4 and the benchmark's batch of 32 cannot move a sample across it."""
    ordered = np.unique(scores)
    gaps = np.diff(ordered)
    middle = len(ordered) // 2
    k = middle + int(np.argmax(gaps[middle:]))  # the widest gap above the median
    return float((ordered[k] + ordered[k + 1]) / 2)


def test_min_quality_keeps_what_benchmark_and_filter_keep(ss_run: Path, tmp_path: Path) -> None:
    plain = scores_of_plain_draws(ss_run, tmp_path / "plain.zarr", 24)
    bar = bar_between(plain)
    passing = np.flatnonzero(plain >= bar)
    wanted = min(4, passing.size)
    assert 0 < wanted < 24 and 0 < bar < 1
    out = tmp_path / "good.zarr"
    code, stdout, stderr = synth(ss_run, out, "--n", str(wanted), "--min-quality", str(bar),
                                 "--real", real_store(ss_run), *JUDGE, "--json")  # fmt: skip
    assert code == 0, stderr
    kept, everything = arrays(out), arrays(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(kept["candidate"], passing[:wanted])
    assert json.loads(stdout)["draws"] >= passing[wanted - 1] + 1
    for name in ("image", "mask"):
        np.testing.assert_array_equal(kept[name], everything[name][passing[:wanted]], err_msg=name)
    np.testing.assert_allclose(kept["quality"], plain[passing[:wanted]], atol=1e-5)
    manifest = manifest_of(out)
    assert manifest["complete"] and manifest["plan"]["min_quality"] == bar
    scores = manifest["quality_scores"]
    assert isinstance(scores, dict) and scores["count"] == wanted
    # The scores are the store's own: `filter` can raise the bar without a benchmark pass.
    code, _, stderr = run_cli(
        "filter", out, "--min-quality", str(bar), "--out", tmp_path / "f.zarr"
    )
    assert code == 0, stderr
    assert manifest_of(tmp_path / "f.zarr")["count"] == wanted


def test_a_real_store_without_held_out_pairs_is_said_to_set_the_bar_on_train(
    ss_run: Path, tmp_path: Path
) -> None:
    """The judge fell back to the train pairs (which its feature network fitted) in silence."""
    train_only = prepare_demo(tmp_path / "t.zarr", "--val-fraction", "0", "--test-fraction", "0",
                              n=24, size=16)  # fmt: skip
    code, _, stderr = synth(ss_run, tmp_path / "s.zarr", "--n", "2", "--min-quality", "0.01",
                            "--real", train_only, *JUDGE)  # fmt: skip
    assert code == 0, stderr
    assert "warning: the --real store has no val or test split, so the scores are relative to " \
        "its train pairs" in stderr  # fmt: skip
    code, _, stderr = synth(ss_run, tmp_path / "h.zarr", "--n", "2", "--min-quality", "0.01",
                            "--real", real_store(ss_run), *JUDGE)  # fmt: skip
    assert code == 0 and "no val or test split" not in stderr, stderr


def test_min_quality_resumes_after_a_kill(ss_run: Path, tmp_path: Path) -> None:
    bar = bar_between(scores_of_plain_draws(ss_run, tmp_path / "plain.zarr", 16))
    options = ["--n", "6", "--min-quality", str(bar), "--real", str(real_store(ss_run)), *JUDGE]
    assert synth(ss_run, tmp_path / "whole.zarr", *options)[0] == 0
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "specdm_cli", "synthesize", "--model", str(ss_run),
               "--out", str(out), *FAST, *options]  # fmt: skip
    environment = {**os.environ, "SPECDM_FAULT": "synthesize.after_batch:1"}
    assert processes.run(command, env=environment).returncode == -signal.SIGKILL
    # Another --feature-steps is refused before a judge is trained; none takes the store's
    # (it trained the default's judge for minutes, then refused the plan).
    code, _, stderr = synth(ss_run, out, *options[: -len(JUDGE)], "--feature-steps", "6")
    assert code == 3 and "the store was begun with 5" in stderr, stderr
    resumed = processes.run(command[: -len(JUDGE)], text=True)
    assert resumed.returncode == 0, resumed.stderr
    whole, again = arrays(tmp_path / "whole.zarr"), arrays(out)
    for name in ("image", "mask", "candidate", "quality"):
        np.testing.assert_array_equal(whole[name], again[name], err_msg=name)
    assert np.all(again["quality"] >= bar)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("--min-quality 0.5", "needs --real"),
        ("--real REAL", "only serve --min-quality"),
        ("--min-quality 1.5 --real REAL", "outside (0, 1]"),
        ("--min-quality 0.5 --real REAL --shard 0/2", "cannot be split"),
        ("--min-quality 0.5 --real REAL --masks REAL", "with --masks"),
    ],
)
def test_min_quality_refusals(ss_run: Path, tmp_path: Path, options: str, message: str) -> None:
    given = [str(real_store(ss_run)) if word == "REAL" else word for word in options.split()]
    code, _, stderr = synth(ss_run, tmp_path / "r.zarr", "--n", "1", *given)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r.zarr").exists()


def test_a_real_store_of_another_task_is_exit_3(
    ss_run: Path, demo_cd_store: Path, tmp_path: Path
) -> None:
    code, _, stderr = synth(ss_run, tmp_path / "r.zarr", "--n", "1", "--min-quality", "0.5",
                            "--real", demo_cd_store)  # fmt: skip
    assert code == 3 and "--real store is task cd" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "r.zarr").exists()
