"""Installing specdm keeps the torch build the user chose (README, Set up)."""

from __future__ import annotations

import json
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.processes import run

ROOT = Path(__file__).resolve().parents[1]


def torch_requirement() -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found = [Requirement(text) for text in project["dependencies"]]
    return next(requirement for requirement in found if requirement.name == "torch")


def test_torch_is_a_range_that_any_build_of_the_tested_release_satisfies() -> None:
    requirement = torch_requirement()
    assert requirement.url is None and not requirement.marker
    assert all(spec.operator not in ("==", "===", "~=") for spec in requirement.specifier)
    # Local versions name a build (2.13.0+cpu, +cu126): the range admits each of them.
    for build in ("2.13.0", "2.13.0+cpu", "2.13.0+cu126"):
        assert requirement.specifier.contains(build), build
    assert not requirement.specifier.contains("3.0")  # an upper bound below the next major


@pytest.mark.slow  # pip builds the package's metadata in an isolated environment: 15-40 s
def test_installing_the_package_never_replaces_the_installed_torch(tmp_path: Path) -> None:
    installed = metadata.version("torch")
    assert torch_requirement().specifier.contains(installed)
    report = tmp_path / "report.json"
    # --upgrade too: its default strategy (only-if-needed) leaves a satisfied torch alone.
    done = run([sys.executable, "-m", "pip", "install", "--dry-run", "--upgrade", "--quiet",
                "--report", str(report), str(ROOT)], timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    planned = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    assert "specdm-cli" in planned and "torch" not in planned, planned
