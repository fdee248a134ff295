"""The demo models shipped in the package: a fresh install synthesizes at once, offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from specdm_cli.pipeline.models import demo_model_path
from specdm_cli.pipeline.run_manifest import load_run
from tests.conftest import run_cli


@pytest.mark.parametrize("task", ["ss", "cd"])
def test_shipped_demo_model_verifies_and_synthesizes(task: str, tmp_path: Path) -> None:
    manifest = load_run(demo_model_path(task))  # checks the sha256 of every weights file
    assert manifest.can_sample() and manifest.task == task
    out = tmp_path / "syn.zarr"
    code, stdout, stderr = run_cli("synthesize", "--task", task, "--n", "2", "--batch-size", "2",
                                   "--steps", "3", "--out", out, "--json", "--quiet")  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["model_kind"] == "demo"
    group = zarr.open_group(out, mode="r")
    label = np.asarray(group["mask" if task == "ss" else "change"][:])
    assert label.shape == (2, manifest.height, manifest.width)
    assert label.max() < len(manifest.classes)
