"""The CLI's start-up contract and the torch Dataset view of stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from specdm_cli import __version__
from specdm_cli.cli import app
from specdm_cli.errors import InputDataError
from specdm_cli.stores.dataset import StoreDataset
from tests import processes
from tests.conftest import run_cli


def test_help_and_version_do_not_import_torch() -> None:
    probe = (
        "import sys\n"
        "from specdm_cli.cli import app\n"
        "assert 'torch' not in sys.modules and 'zarr' not in sys.modules, 'heavy import at top'\n"
    )
    assert processes.run([sys.executable, "-c", probe]).returncode == 0
    done = processes.run(processes.python("--version"), text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"specdm {__version__}"


def test_help_lists_the_commands() -> None:
    code, stdout, _ = run_cli("--help")
    assert code == 0 and "prepare" in stdout and "inspect" in stdout
    # `specdm` alone prints the same help, laid out, not squashed into an error line.
    code, alone, stderr = run_cli()
    assert code == 2 and stderr == "" and alone.strip() == stdout.strip()


def test_every_command_takes_quiet(demo_ss_store: Path) -> None:
    """`inspect -q` was "No such option" (exit 2) while the README has every command take it."""
    for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        code, stdout, _ = run_cli(name, "--help")
        assert code == 0 and "--quiet" in stdout and "-q" in stdout, name
    code, quiet, stderr = run_cli("inspect", demo_ss_store, "-q")
    assert code == 0 and stderr == "", stderr
    assert quiet == run_cli("inspect", demo_ss_store)[1]
    # --verify reads every sample (minutes for a large store): told on stderr, unless -q.
    code, verified, stderr = run_cli("inspect", demo_ss_store, "--verify", "--json")
    assert code == 0 and "inspect: reading samples 24/24 (100%)" in stderr, stderr
    assert json.loads(verified)["verified"]
    code, stdout, stderr = run_cli("inspect", demo_ss_store, "--verify", "-q")
    assert code == 0 and stderr == "", stderr
    # The summary says the check passed (it read as inspect without --verify).
    assert "verified: all samples match their checksums" in stdout and "verified" not in quiet


def test_a_store_given_for_a_run_and_a_run_for_a_store_are_named_as_such(
    demo_ss_store: Path, tmp_path: Path
) -> None:
    """`fit-diffusion STORE` said "run `specdm fit-vae` first" and `fit-vae RUN` "run `specdm
    prepare` first", though the folder was the other one of the pair."""
    from specdm_cli.pipeline.runs.choose import demo_model_path

    run = demo_model_path("ss")
    out = tmp_path / "x.zarr"
    for_runs: list[list[str | Path]] = [
        ["fit-diffusion", demo_ss_store],
        ["synthesize", "--model", demo_ss_store, "--n", "2", "--out", out],
    ]
    for command in for_runs:
        code, _, stderr = run_cli(*command)
        assert code == 4 and "a store (manifest.json), no run.json" in stderr, stderr
        assert f"specdm fit-vae {demo_ss_store} --run RUN" in stderr
    for name in ("fit-vae", "inspect"):
        code, _, stderr = run_cli(name, run)
        assert code == 3 and "a run folder (run.json), no manifest.json" in stderr, stderr
        assert "the store it was trained on (its run.json names demo scenes" in stderr
        assert stderr.count("\n") == 1
    # A synthetic store names the run that made it; another tool's run.json is no run.
    synthetic = tmp_path / "syn.zarr"
    code, _, stderr = run_cli("synthesize", "--model", "demo", "--task", "ss", "--n", "1",
                              "--steps", "1", "--no-detail", "-q", "--out", synthetic)  # fmt: skip
    assert code == 0, stderr
    code, _, stderr = run_cli("fit-diffusion", synthetic)
    assert code == 4 and f"pass the run that made it ({run})" in stderr, stderr
    foreign = tmp_path / "other-tool-run"
    foreign.mkdir()
    (foreign / "run.json").write_text('{"id": 1}')
    code, _, stderr = run_cli("inspect", foreign)
    assert code == 3 and "not a specdm store: no manifest.json" in stderr, stderr


def test_dataset_keys_split_and_dtypes(demo_ss_store: Path) -> None:
    train = StoreDataset(demo_ss_store, split="train")
    everything = StoreDataset(demo_ss_store)
    assert 0 < len(train) < len(everything) == 24
    sample = train[0]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (10, 32, 32)
    assert sample["mask"].dtype == torch.int64 and sample["mask"].shape == (32, 32)
    assert "origin" not in sample
    # A split the store lacks, or a misspelt one, is an error, not an empty dataset.
    with pytest.raises(
        InputDataError,
        match=r"no 'synthetic' samples \(splits here: test \d+, train \d+, val \d+\)",
    ):
        StoreDataset(demo_ss_store, split="synthetic")
    with pytest.raises(ValueError, match="split 'trian' is none of train, val, test, synthetic"):
        StoreDataset(demo_ss_store, split="trian")


def test_torchgeo_layout_for_change_detection(demo_cd_store: Path) -> None:
    sample = StoreDataset(demo_cd_store, layout="torchgeo")[1]
    assert sample["image"].shape == (2, 10, 32, 32)
    assert sample["mask"].shape == (1, 32, 32)
    plain = StoreDataset(demo_cd_store)[1]
    assert torch.equal(sample["image"][1], plain["image_t2"])


def test_several_stores_carry_their_origin(demo_ss_store: Path, tmp_path: Path) -> None:
    joined = StoreDataset([demo_ss_store, demo_ss_store])
    assert len(joined) == 48
    assert joined[0]["origin"] == 0 and joined[47]["origin"] == 1
    assert torch.equal(joined[0]["image"], joined[24]["image"])


def test_stores_of_other_shapes_cannot_be_joined(demo_ss_store: Path, demo_cd_store: Path) -> None:
    with pytest.raises(InputDataError, match="cannot be joined"):
        StoreDataset([demo_ss_store, demo_cd_store])


@pytest.fixture(scope="module")
def home_seen_by_module_fixtures() -> str | None:
    return os.environ.get("SPECDM_HOME")


def test_module_fixtures_do_not_write_to_the_real_user_dirs(
    home_seen_by_module_fixtures: str | None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Runs made by session or module fixtures are registered; they must land in a temp home.
    assert home_seen_by_module_fixtures is not None
    assert Path(home_seen_by_module_fixtures).is_relative_to(tmp_path_factory.getbasetemp())


def test_synthesize_steps_help_names_the_default_step_counts() -> None:
    # The CLI module cannot import the samplers (torch), so its help repeats their defaults.
    from specdm_cli.models.samplers import DEFAULT_STEPS

    command = typer.main.get_command(app).commands["synthesize"]  # type: ignore[attr-defined]
    (steps,) = [p for p in command.params if p.name == "steps"]
    for sampler, count in DEFAULT_STEPS.items():
        assert f"{sampler} {count}" in str(steps.help)


def test_progress_in_a_log_file_is_plain_unwrapped_lines(tmp_path: Path) -> None:
    # CliRunner's stderr is not a terminal, as a redirected log file is not.
    out = tmp_path / ("a-long-folder-name-that-pushes-the-path-past-eighty-columns" * 2) / "s.zarr"
    code, _, stderr = run_cli("prepare", "demo", "--n", "24", "--size", "32", "--out", out)
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert lines[-2].startswith("prepare 24/24 (100%)")
    assert lines[-1].startswith("created: ") and str(out) in lines[-1]  # one line, not wrapped
    code, _, stderr = run_cli("prepare", "demo", "--n", "24", "--size", "32", "--out",
                              tmp_path / "q.zarr", "--quiet")  # fmt: skip
    assert code == 0 and stderr == ""


def test_inputs_that_are_not_there_are_told_before_torch_loads(tmp_path: Path) -> None:
    # Loading torch takes seconds on a busy machine; a typo in a path should not.
    script = """
import sys
from typer.testing import CliRunner
from specdm_cli.cli import app
for args in (
    ["fit-vae", "nosuch.zarr"],
    ["fit-diffusion", "nosuch"],
    ["distill", "demo"],
    ["synthesize", "--model", "nope", "--n", "2", "--out", "x.zarr"],
    ["synthesize", "--model", "demo", "--task", "ss", "--masks", "no.zarr", "--n", "2", "--out", "x.zarr"],
    ["benchmark", "--real", "no.zarr", "--synthetic", "no2.zarr"],
):
    result = CliRunner().invoke(app, args)
    print(result.exit_code, "torch" in sys.modules, result.stderr.strip())
"""
    done = processes.run([sys.executable, "-c", script], text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["3", "False"], ["4", "False"], ["4", "False"], ["4", "False"], ["3", "False"],
        ["3", "False"],
    ]  # fmt: skip
    assert "error: store does not exist (nosuch.zarr)" in lines[0]
    assert "no such run folder (nosuch)" in lines[1] and "read-only" in lines[2]
    assert "--masks: store does not exist (no.zarr)" in lines[4]
    assert "--real: store does not exist (no.zarr)" in lines[5]


def test_synthesize_usage_errors_that_need_no_model_are_told_before_torch_loads(
    tmp_path: Path,
) -> None:
    # They were told after torch and diffusers loaded: 10-19 s on a busy machine.
    script = """
import sys
from typer.testing import CliRunner
from specdm_cli.cli import app
base = ["synthesize", "--n", "2", "--out", "x.zarr"]
for args in (
    ["--model", "demo"],
    [],
    ["--task", "ss", "--batch-size", "abc"],
    ["--task", "ss", "--preview", "x.jpg"],
    ["--task", "cd", "--shard", "2/2"],
    ["--task", "ss", "--batch-size", "\u00b2"],  # "²".isdigit() is True; int("²") raised
):
    result = CliRunner().invoke(app, [*base, *args])
    print(result.exit_code, "torch" in sys.modules, result.stderr.strip())
"""
    done = processes.run([sys.executable, "-c", script], text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [["2", "False"]] * 6, lines
    assert "--model demo holds an ss and a cd model, --task is needed" in lines[0]
    assert "without --model, --task is needed" in lines[1]
    assert "--batch-size 'abc'" in lines[2] and "--preview x.jpg" in lines[3]
    assert "--shard '2/2'" in lines[4] and "is not a number >= 1 or auto" in lines[5]
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize(
    ("resumable", "line"),
    [
        (True, "interrupted: rerun with --resume"),
        (False, "interrupted: this command does not resume; run it again"),
    ],
)
def test_an_interrupt_points_at_resume_only_where_the_command_has_it(
    capsys: pytest.CaptureFixture[str], resumable: bool, line: str
) -> None:
    """benchmark (no --resume) told users to rerun with --resume, which it refuses."""
    from specdm_cli.cli.output import domain_errors
    from specdm_cli.errors import Interrupted

    with pytest.raises(typer.Exit) as exited, domain_errors(resumable):
        raise Interrupted(signal.SIGINT)
    assert exited.value.exit_code == 130
    assert capsys.readouterr().err.startswith(line)


@pytest.mark.parametrize("extra", [(), ("--json",)], ids=["table", "json"])
def test_a_reader_that_leaves_the_pipe_gets_a_quiet_exit_141(
    demo_ss_store: Path, extra: tuple[str, ...]
) -> None:
    """`specdm inspect STORE | head -1` exited 1 with nothing on stderr (rich's and click's
    default): a `set -o pipefail` job failed without a word. 141 is what `cat` gets there."""
    process = processes.start(
        processes.python("inspect", demo_ss_store, *extra), None,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the CLI has imported: its first write meets no reader
    try:
        stderr = process.stderr.read()
        assert process.wait(timeout=120) == 141, stderr
    finally:
        processes.kill_group(process)
    assert stderr == b""
