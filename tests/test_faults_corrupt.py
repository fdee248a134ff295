"""Corrupt run directories, property-based: weights, `config.json`, `run.json`, optimizer state.

Whatever the damage, a command that loads the run either works (the damage did not matter) or
exits 4 with one `error:` line and no traceback. Weights whose sha256 differs from run.json are
always refused; to reach the safetensors parser itself, some cases record the garbled file's
sha256 in run.json (as a buggy writer or a careful attacker would).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specdm_cli.fs.paths import file_sha256
from specdm_cli.pipeline.runs.choose import demo_model_path
from tests.conftest import PAPER_LOSS, prepare_demo, run_cli
from tests.fault_tools import assert_one_error_line, stage_of
from tests.test_faults_inputs import GARBLING, garble

BOUNDED = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Cases that load and sample a model: 20 keep the file under about 30 s on 2 cores.
EXAMPLES_20 = settings(BOUNDED, max_examples=20)
VAE = ("--image-blocks", "8,16,16", "--mask-blocks", "8,8,16", "--norm-groups", "4",
       *PAPER_LOSS,
       "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--quiet", "--steps", "2")  # fmt: skip
UNET = ("--unet-blocks", "16,32", "--norm-groups", "8", "--head-dim", "8", "--layers-per-block", "1",
        "--batch-size", "4", "--lr", "1e-3", "--threads", "2", "--quiet")  # fmt: skip
SYNTH = ("--n", "1", "--batch-size", "1", "--steps", "1", "--threads", "2", "--quiet")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run that can sample: a 2-step VAE and a 2-step U-Net on a 16 px demo store."""
    root = tmp_path_factory.mktemp("tiny")
    store = prepare_demo(root / "s.zarr", n=16, size=16)
    run = root / "run"
    for command in (
        ("fit-vae", store, "--run", run, *VAE),
        ("fit-diffusion", run, *UNET, "--steps", "2"),
    ):
        code, _, stderr = run_cli(*command)
        assert code == 0, stderr
    return run


def copy_of(run: Path, root: Path) -> Path:
    """A copy to damage; the latent cache (never damaged, only read) is hard-linked."""

    def copy(source: str, target: str) -> None:
        if "latents.zarr" in Path(source).parts:
            os.link(source, target)
        else:
            shutil.copy2(source, target)

    shutil.copytree(run, root / "run", copy_function=copy)
    return root / "run"


def load_with_the_command_that_reads(run: Path, relative: str) -> tuple[int, str]:
    """Run the command that reads `relative`: a training resume for optimizer and training
    state, else `synthesize` (run.json, the VAE branches, the EMA U-Net)."""
    folder = Path(relative).parts[1] if relative.startswith("checkpoints/") else ""
    training = ("optimizer." in relative, "train_unet" in relative, relative.endswith("ema.json"))
    if folder.startswith("vae-") and any(training):
        store = json.loads((run / "run.json").read_text())["source_store"]
        command: tuple[str | Path, ...] = ("fit-vae", store, "--run", run, *VAE, "--steps", "3")
    elif any(training):
        command = ("fit-diffusion", run, *UNET, "--steps", "3")
    else:
        out = run.parent / "o.zarr"
        code, _, stderr = run_cli("synthesize", "--model", run, "--out", out, *SYNTH)
        return code, stderr
    code, _, stderr = run_cli(*command, "--resume")
    return code, stderr


def assert_works_or_exit_4(code: int, stderr: str) -> None:
    if code != 0:
        assert_one_error_line(code, stderr, 4)


def weights_files(run: Path) -> list[str]:
    manifest = json.loads((run / "run.json").read_text())
    return sorted(k for stage in manifest["stages"].values() for k in stage["weights"])


def record_sha256(run: Path, relative: str) -> None:
    """Write the current sha256 of `relative` into run.json (as if the writer had made it so)."""
    manifest = json.loads((run / "run.json").read_text())
    for stage in manifest["stages"].values():
        if relative in stage["weights"]:
            stage["weights"][relative] = file_sha256(run / relative)
    (run / "run.json").write_text(json.dumps(manifest))


@BOUNDED
@given(st.data(), *GARBLING)
def test_weights_that_do_not_match_run_json_are_refused(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
    cut: int, flips: list[tuple[int, int]],
) -> None:  # fmt: skip
    run = copy_of(tiny_run, tmp_path_factory.mktemp("tampered"))
    relative = data.draw(st.sampled_from(weights_files(run)), label="file")
    target = run / relative
    target.write_bytes(garble(target.read_bytes(), cut, flips))  # always shorter: always differs
    code, stderr = load_with_the_command_that_reads(run, "run.json")
    assert_one_error_line(code, stderr, 4, "do not match run.json")


@EXAMPLES_20
@given(st.data(), *GARBLING)
def test_garbled_safetensors_with_their_sha256_recorded_fail_cleanly(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
    cut: int, flips: list[tuple[int, int]],
) -> None:  # fmt: skip
    run = copy_of(tiny_run, tmp_path_factory.mktemp("garbled"))
    relative = data.draw(st.sampled_from(weights_files(run)), label="file")
    target = run / relative
    target.write_bytes(garble(target.read_bytes(), cut, flips))
    record_sha256(run, relative)
    assert_works_or_exit_4(*load_with_the_command_that_reads(run, relative))


LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 64), st.floats(-10, 10), st.text(max_size=4),
    st.lists(st.integers(0, 16), max_size=3),
)  # fmt: skip


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a leaf (and to every list or object) of a JSON document."""
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return [prefix]
    return [prefix, *(p for key, child in items for p in leaf_paths(child, (*prefix, key)))]


def replace_at(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    document[path[0]] = replace_at(document[path[0]], path[1:], value)
    return document


def checkpoint_json_files(run: Path) -> list[str]:
    """Every config.json and optimizer.json of the checkpoints run.json names."""
    files = []
    for stage in ("vae", "diffusion"):
        folder = run / str((stage_of(run, stage) or {})["checkpoint"])
        files += sorted(str(p.relative_to(run)) for p in folder.rglob("*.json"))
    # ema.json: see test_garbled_ema_json_fails_cleanly.
    return [f for f in files if not f.endswith("ema.json")]


def damage_json(target: Path, data: st.DataObject, cut: int, flips: list[tuple[int, int]]) -> None:
    """Garble the bytes, or put one value of another type or size anywhere in the document."""
    if data.draw(st.booleans(), label="garble bytes (else change one value)"):
        target.write_bytes(garble(target.read_bytes(), cut, flips))
    else:
        document = json.loads(target.read_text())
        path = data.draw(st.sampled_from(leaf_paths(document)), label="path")
        target.write_text(json.dumps(replace_at(document, path, data.draw(LEAF, label="value"))))


@EXAMPLES_20
@given(st.data(), *GARBLING)
def test_garbled_run_json_fails_cleanly(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
    cut: int, flips: list[tuple[int, int]],
) -> None:  # fmt: skip
    run = copy_of(tiny_run, tmp_path_factory.mktemp("run-json"))
    damage_json(run / "run.json", data, cut, flips)
    assert_works_or_exit_4(*load_with_the_command_that_reads(run, "run.json"))


@EXAMPLES_20
@given(st.data(), *GARBLING)
def test_garbled_checkpoint_json_fails_cleanly(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject,
    cut: int, flips: list[tuple[int, int]],
) -> None:  # fmt: skip
    run = copy_of(tiny_run, tmp_path_factory.mktemp("json"))
    relative = data.draw(st.sampled_from(checkpoint_json_files(run)), label="file")
    damage_json(run / relative, data, cut, flips)
    assert_works_or_exit_4(*load_with_the_command_that_reads(run, relative))


@pytest.mark.parametrize("sub", ["unet", "train_unet"])
def test_a_null_scalar_in_a_unet_config_is_exit_4(tiny_run: Path, tmp_path: Path, sub: str) -> None:
    """Found by the property above: diffusers builds a U-Net with mid_block_scale_factor null
    and fails only in its first forward pass."""
    run = copy_of(tiny_run, tmp_path)
    stage = stage_of(run, "diffusion")
    assert stage is not None
    relative = f"{stage['checkpoint']}/{sub}/config.json"
    config = json.loads((run / relative).read_text())
    config["mid_block_scale_factor"] = None
    (run / relative).write_text(json.dumps(config))
    code, stderr = load_with_the_command_that_reads(run, relative)
    assert code == 4 and "mid_block_scale_factor" in stderr, stderr


def test_garbled_ema_json_fails_cleanly(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_of(tiny_run, tmp_path)
    stage = stage_of(run, "diffusion")
    assert stage is not None
    relative = f"{stage['checkpoint']}/ema.json"
    (run / relative).write_text("{}")
    assert_works_or_exit_4(*load_with_the_command_that_reads(run, relative))


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (("prepare", "demo", "--n", "4", "--size", "16", "--quiet", "--out"), 3),
        (("fit-vae", "STORE", *VAE, "--run"), 3),
        (("synthesize", "--model", "RUN", *SYNTH, "--out"), 3),
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_ours(
    tiny_run: Path, tmp_path: Path, command: tuple[str, ...], code: int
) -> None:
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    (foreign / "manifest.json").write_text('{"complete": true}')  # a manifest, not specdm's
    (foreign / "run.json").write_text('{"specdm_run": "yes"}')  # nor a run.json of ours
    store = json.loads((tiny_run / "run.json").read_text())["source_store"]
    args = [store if a == "STORE" else tiny_run if a == "RUN" else a for a in command]
    exit_code, _, stderr = run_cli(*args, foreign, "--overwrite")
    assert_one_error_line(exit_code, stderr, code, "not a specdm")
    assert (foreign / "chapter1.tex").read_text() == "precious"


def test_a_weights_file_missing_from_run_json_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    run = copy_of(tiny_run, tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    weights = manifest["stages"]["diffusion"]["weights"]
    dropped = next(k for k in sorted(weights) if "/unet/" in k)
    del weights[dropped]  # the EMA U-Net would load without its sha256 being checked
    (run / "run.json").write_text(json.dumps(manifest))
    code, stderr = load_with_the_command_that_reads(run, "run.json")
    assert_one_error_line(code, stderr, 4, "not listed in run.json")


def test_a_run_whose_class_indices_repeat_is_a_model_error(tmp_path: Path) -> None:
    # Found by the hypothesis test above: `"index": false` beside index 0 used to pass run.json
    # and fail later, in the synthetic store's manifest, as "unexpected ValidationError".
    run = tmp_path / "run"
    shutil.copytree(demo_model_path("ss"), run)
    document = json.loads((run / "run.json").read_text())
    document["classes"][1]["index"] = False
    (run / "run.json").write_text(json.dumps(document))
    code, _, stderr = run_cli(
        "synthesize", "--model", run, "--n", "2", "--out", tmp_path / "o.zarr"
    )
    assert code == 4 and "class indices" in stderr and "unexpected" not in stderr
    assert not (tmp_path / "o.zarr").exists()


def test_damaged_optimizer_state_s_hint_trains_the_stage_anew(
    tiny_run: Path, tmp_path: Path
) -> None:
    """The hint was "restart without --resume", which the run then refused ("pass --resume"):
    fit-diffusion had no way to train its U-Net again. --overwrite does, as its hint says."""
    run = copy_of(tiny_run, tmp_path)
    recorded = stage_of(run, "diffusion")
    assert recorded is not None
    (run / str(recorded["checkpoint"]) / "optimizer.json").write_text("{")
    steps = ("fit-diffusion", run, *UNET, "--steps", "3")
    code, _, stderr = run_cli(*steps, "--resume")
    assert_one_error_line(code, stderr, 4, "--overwrite in place of --resume")
    code, _, stderr = run_cli(*steps)
    assert_one_error_line(code, stderr, 3, "or --overwrite to train a new one")
    code, _, stderr = run_cli(*steps, "--overwrite", "--resume")
    assert code == 2 and "exclude each other" in stderr
    assert run_cli(*steps, "--overwrite")[0] == 0
    stage = stage_of(run, "diffusion")
    assert stage is not None and stage["finished"] is True and stage["step"] == 3
    folders = [f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("diffusion-*")]
    assert folders == [stage["checkpoint"]]  # the old U-Net's went at the new one's checkpoint
