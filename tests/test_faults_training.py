"""Fault suite for `fit-vae` and `fit-diffusion`: kills at named points, SIGTERM and SIGINT.

The killed or signalled run is the real CLI in a subprocess (SPECDM_FAULT kills it or freezes it
at a named point, see `specdm_cli/faults.py`); the reference and the `--resume` run in-process,
which is the same code and saves importing torch again. After `--resume`, every tensor of the
final checkpoint (weights, EMA, optimizer) equals an uninterrupted run's at the same step, and
the run dir holds no temporary file, partial or unnamed checkpoint folder, or lock.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import zarr

from specdm_cli.fs.lock import LOCK_NAME
from specdm_cli.pipeline.runs.registry import read_registry, user_dir
from specdm_cli.pipeline.runs.run_manifest import load_run
from tests import processes
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli
from tests.fault_tools import (
    assert_clean_run,
    assert_one_error_line,
    assert_same_state,
    checkpoint_state,
    run_killed,
    signal_at_stop,
    spawn,
    stage_of,
    wait_until_stopped,
)

VAE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
       *PAPER_LOSS,
       "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--val-every", "100", "--quiet")  # fmt: skip
UNET = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8", "--layers-per-block", "1",
        "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--quiet")  # fmt: skip
STEPS = ("--steps", "6", "--checkpoint-every", "2")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_demo(tmp_path_factory.mktemp("store") / "s.zarr", n=16, size=16)


def fit_vae(store: Path, run: Path, *extra: str) -> None:
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, *extra)
    assert code == 0, stderr


@pytest.fixture(scope="module")
def vae_reference(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    run = tmp_path_factory.mktemp("vae-ref") / "run"
    fit_vae(store, run, *STEPS)
    return checkpoint_state(run, "vae")


@pytest.fixture(scope="module")
def vae_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny VAE: the start of every fit-diffusion case."""
    run = tmp_path_factory.mktemp("vae") / "run"
    fit_vae(store, run, "--steps", "2")
    return run


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(LOCK_NAME))
    return target


@pytest.fixture(scope="module")
def diffusion_reference(
    vae_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    run = copy_run(vae_run, tmp_path_factory.mktemp("diffusion-ref") / "run")
    code, _, stderr = run_cli("fit-diffusion", run, *UNET, *STEPS)
    assert code == 0, stderr
    return checkpoint_state(run, "diffusion")


def assert_killed_state_is_honest(run: Path, stage: str, done_before: int) -> None:
    """After a kill: the lock is left, and run.json names only a whole, earlier checkpoint."""
    assert (run / LOCK_NAME).exists()
    recorded = stage_of(run, stage)
    if recorded is not None:
        assert recorded["finished"] is False and recorded["step"] == done_before
    load_run(run)  # every weights file run.json lists is there and matches its sha256


# What each kill leaves (checkpoints every 2 steps, so the nth checkpoint is step 2n):
# - checkpoint.mid_write:2: `.vae-0000004.partial` holds weights and optimizer tensors, no
#   optimizer.json; run.json names step 2. The resume checkpoints every 3 steps, so step 4 is
#   never written again: only the new lock's clean-up removes the partial folder.
# - atomic.before_replace:3: the third atomic write is run.json at the first checkpoint (after its
#   creation and optimizer.json): a whole `.run.json.*.tmp` not renamed yet, run.json has no VAE while
#   `checkpoints/vae-0000002` is already published; the resume starts from step 0.
@pytest.mark.parametrize(
    ("fault", "done_before"), [("checkpoint.mid_write:2", 2), ("atomic.before_replace:3", 0)]
)
def test_fit_vae_killed_then_resumed_equals_the_uninterrupted_run(
    store: Path, vae_reference: dict[str, object], tmp_path: Path, fault: str, done_before: int
) -> None:
    run = tmp_path / "run"
    run_killed("fit-vae", store, "--run", run, *VAE, *STEPS, fault=fault)
    assert_killed_state_is_honest(run, "vae", done_before)
    fit_vae(store, run, "--steps", "6", "--checkpoint-every", "3", "--resume")
    stage = stage_of(run, "vae")
    assert stage is not None and stage["finished"] is True and stage["step"] == 6
    assert_same_state(checkpoint_state(run, "vae"), vae_reference)
    assert_clean_run(run)


# - checkpoint.before_publish:2: `.diffusion-0000004.partial` is whole but not moved into place.
# - checkpoint.after_publish:2: `checkpoints/diffusion-0000004` is in place, run.json names step 2.
@pytest.mark.parametrize(
    "fault",
    [
        "checkpoint.before_publish:2",
        pytest.param(
            "checkpoint.after_publish:2",
            # A second fit-diffusion subprocess (torch + diffusers imports): about 15-20 s.
            marks=pytest.mark.slow,
        ),
    ],
)
def test_fit_diffusion_killed_then_resumed_equals_the_uninterrupted_run(
    vae_run: Path, diffusion_reference: dict[str, object], tmp_path: Path, fault: str
) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    run_killed("fit-diffusion", run, *UNET, *STEPS, fault=fault)
    assert_killed_state_is_honest(run, "diffusion", 2)
    code, _, stderr = run_cli("fit-diffusion", run, *UNET, *STEPS, "--resume")
    assert code == 0, stderr
    assert_same_state(checkpoint_state(run, "diffusion"), diffusion_reference)
    assert_clean_run(run)


@pytest.mark.slow  # a fit-diffusion subprocess (torch + diffusers imports): about 15 s
def test_a_signal_stops_the_latent_cache_build_and_resume_rebuilds_it(
    vae_run: Path, diffusion_reference: dict[str, object], tmp_path: Path
) -> None:
    run = copy_run(vae_run, tmp_path / "run")
    process = spawn("fit-diffusion", run, *UNET, *STEPS, fault="latent_cache.after_batch:1:stop")
    stderr = signal_at_stop(process, signal.SIGTERM)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: rerun with --resume"
    assert "complete" not in zarr.open_group(run / "latents.zarr", mode="r").attrs
    assert stage_of(run, "diffusion") is None
    code, _, stderr = run_cli("fit-diffusion", run, *UNET, *STEPS, "--resume")
    assert code == 0, stderr
    assert_same_state(checkpoint_state(run, "diffusion"), diffusion_reference)
    assert_clean_run(run)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_fit_vae_at_a_checkpoint_and_resume_is_exact(
    store: Path,
    vae_reference: dict[str, object],
    tmp_path: Path,
    signum: signal.Signals,
    exit_code: int,
) -> None:
    run = tmp_path / "run"
    # Frozen right after its first checkpoint (step 2): alive, holding the run's lock.
    process = spawn(
        "fit-vae", store, "--run", run, *VAE, *STEPS, fault="checkpoint.after_commit:1:stop"
    )
    try:
        wait_until_stopped(process)
        # A second writer on the same run dir is refused while the first lives (exit 6).
        for command in (
            ("fit-vae", store, "--run", run, *VAE, *STEPS, "--resume"),
            ("fit-vae", store, "--run", run, *VAE, *STEPS, "--overwrite"),
            ("fit-diffusion", run, *UNET, *STEPS),
        ):
            code, _, stderr = run_cli(*command)
            assert_one_error_line(code, stderr, 6, f"process {process.pid}")
        assert (run / "run.json").is_file()  # --overwrite removed nothing
        process.send_signal(signum)  # delivered when it runs again
    finally:
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=300)
    # The signal landed during step 2's clean-up: step 3 is trained and checkpointed, then exit.
    assert process.returncode == exit_code, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted: rerun with --resume (the run: {run})"
    stage = stage_of(run, "vae")
    assert stage is not None and stage["step"] == 3 and stage["finished"] is False
    assert_clean_run(run)
    fit_vae(store, run, *STEPS, "--resume")
    assert_same_state(checkpoint_state(run, "vae"), vae_reference)


@pytest.mark.slow  # a fit-vae subprocess (torch imports): about 10 s
def test_a_signal_stops_the_semantic_terms_segmenter_and_resume_starts_over(
    tmp_path: Path,
) -> None:
    """The segmenter trains before the VAE's first step (300 steps, a minute or more in the cpu
    preset); Ctrl-C went unheard until it finished. Nothing is trained yet: the run folder goes,
    and the line says to run the command again (it said "rerun with --resume")."""
    store = prepare_demo(tmp_path / "ss.zarr", n=24, size=16)
    run = tmp_path / "run"
    args = ("fit-vae", store, "--run", run, *VAE, "--steps", "2", "--semantic-weight", "0.3")
    process = spawn(*args, "--semantic-steps", "100000", fault="segmenter.after_step:1:stop")
    stderr = signal_at_stop(process, signal.SIGINT, timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: nothing was trained yet: run the same command again"
    )
    assert not run.exists()
    code, _, stderr = run_cli(*args, "--semantic-steps", "3")
    assert code == 0, stderr


def test_fit_vae_without_run_interrupted_is_resumed_by_the_same_command_with_resume(
    store: Path, vae_reference: dict[str, object], tmp_path: Path
) -> None:
    """`fit-vae STORE` (a run folder of its own choosing), then Ctrl-C and `--resume`: the
    resume started a second folder from step 0, and the first was never named."""
    process = spawn("fit-vae", store, *VAE, *STEPS, fault="checkpoint.after_commit:1:stop")
    stderr = signal_at_stop(process, signal.SIGINT)
    assert process.returncode == 130, stderr
    runs = sorted((user_dir() / "runs").iterdir())
    assert runs[0].name.startswith("s-")  # the store's name (s.zarr), not its source's (demo)
    assert len(runs) == 1 and stderr.strip().splitlines()[-1] == (
        f"interrupted: rerun with --resume (the run: {runs[0]})"
    )
    code, stdout, stderr = run_cli("fit-vae", store, *VAE, *STEPS, "--resume", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["run"] == str(runs[0]) and sorted(runs[0].parent.iterdir()) == runs
    assert_same_state(checkpoint_state(runs[0], "vae"), vae_reference)
    other = prepare_demo(tmp_path / "other.zarr", "--seed", "1", n=12, size=16)
    code, _, stderr = run_cli("fit-vae", other, *VAE, "--resume")
    assert code == 3 and "--resume without --run: no run of this store" in stderr


# Ctrl-C reaches the whole process group; a batch system's SIGTERM often the parent alone.
@pytest.mark.slow  # a CLI subprocess and two spawned ranks import torch: about 40 s each
@pytest.mark.parametrize(
    ("stage", "signum", "to_group", "exit_code"),
    [("fit-vae", signal.SIGINT, True, 130), ("fit-diffusion", signal.SIGTERM, False, 143)],
    ids=["fit-vae-ctrl-c", "fit-diffusion-sigterm-to-parent"],
)
def test_a_signal_stops_two_ranks_at_a_checkpoint(
    store: Path,
    vae_run: Path,
    tmp_path: Path,
    stage: str,
    signum: signal.Signals,
    to_group: bool,
    exit_code: int,
) -> None:
    """The ranks finish the step in hand together, rank 0 checkpoints it, and the parent says
    interrupted; it used to exit 0 reporting "trained" (and registering) an unfinished run."""
    run = tmp_path / "run"
    if stage == "fit-vae":
        args: tuple[str | Path, ...] = ("fit-vae", store, "--run", run, *VAE)
    else:
        args = ("fit-diffusion", copy_run(vae_run, run), *UNET)
    # Rank 0 freezes right after its first checkpoint (step 2); rank 1 waits for it in step 3.
    # With SIGTERM, each rank also freezes once it has told how it ended, as a torch teardown
    # that waited on a rank that had left did (1 run in several under load): the parent ends it.
    fault = "checkpoint.after_commit:1:stop" + ("" if to_group else ",rank.after_outcome:1:stop")
    parent = spawn(*args, "--steps", "400", "--checkpoint-every", "2", "--gpus", "cpu:2",
                   fault=fault)  # fmt: skip

    def frozen_ranks() -> list[int]:
        return [pid for pid in processes.ranks_of(parent.pid) if processes.is_stopped(pid)]

    processes.wait_for(lambda: bool(frozen_ranks()), seconds=300)  # torch imports, twice
    frozen = frozen_ranks()
    if to_group:
        os.killpg(parent.pid, signum)
    else:
        parent.send_signal(signum)  # the parent forwards it to the ranks
        processes.wait_for(lambda: all(processes.has_pending(pid, signum) for pid in frozen))
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    _, stderr = parent.communicate(timeout=300)
    assert parent.returncode == exit_code, stderr
    told = "rerun with --resume" + (f" (the run: {run})" if stage == "fit-vae" else "")
    assert stderr.strip().splitlines() == [f"interrupted: {told}"]  # the ranks' lines too
    recorded = stage_of(run, stage.removeprefix("fit-"))
    assert recorded is not None and recorded["finished"] is False, recorded
    assert recorded["step"] == 3  # the step in hand when the signal landed, checkpointed
    assert all(entry.get("path") != str(run.resolve()) for entry in read_registry())
    assert_clean_run(run)


def test_fit_vae_overwrite_keeps_the_old_run_until_the_new_one_checkpoints(
    store: Path, vae_run: Path, tmp_path: Path
) -> None:
    """`--overwrite` removed the old run before anything of the new one existed: a divergence,
    a bad store, Ctrl-C or a kill before the new run's first checkpoint lost both."""
    run = copy_run(vae_run, tmp_path / "run")
    before = checkpoint_state(run, "vae")
    # Diverges at step 2, before the first checkpoint (step 2): the old run comes back.
    code, _, stderr = run_cli("fit-vae", store, "--run", run, *VAE, *STEPS, "--lr", "1e12",
                              "--overwrite")  # fmt: skip
    assert_one_error_line(code, stderr, 4, "diverged")
    assert "a lower --lr and --overwrite" in stderr  # "then --resume" met "options differ"
    assert_same_state(checkpoint_state(run, "vae"), before)
    assert_clean_run(run)
    # Killed while writing its first checkpoint: the next writer on the run brings it back.
    run_killed("fit-vae", store, "--run", run, *VAE, *STEPS, "--overwrite",
               fault="checkpoint.mid_write:1")  # fmt: skip
    code, stdout, stderr = run_cli("fit-vae", store, "--run", run, *VAE, "--steps", "2",
                                   "--resume", "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["state"] == "already complete", stderr
    assert_same_state(checkpoint_state(run, "vae"), before)
    # A new run's first checkpoint replaces the old run: nothing of it is left.
    fit_vae(store, run, *STEPS, "--overwrite")
    stage = stage_of(run, "vae")
    assert stage is not None and stage["step"] == 6 and stage["finished"] is True
    assert set(load_run(run).stages) == {"vae"}
    assert_clean_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "metrics.jsonl", "run.json"]
