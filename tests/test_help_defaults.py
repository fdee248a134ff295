"""The defaults the training commands' --help writes in brackets ("[0.1]", "[cpu 16, gpu 16,
paper 48]", "[cpu 250, else 1000]") are what each preset trains with: help text restates the
configs and presets, so this is what keeps the two from drifting apart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.main
from pydantic import BaseModel

from specdm_cli.cli.app import app
from specdm_cli.config import (
    DetailConfig,
    Devices,
    DiffusionTrainConfig,
    DistillTrainConfig,
    TrainPreset,
    VAETrainConfig,
    train_option,
)
from specdm_cli.presets import DIFFUSION_PRESETS, VAE_PRESETS, train_values

COMMANDS: dict[str, tuple[type[BaseModel], dict[TrainPreset, dict[str, Any]] | None]] = {
    "fit-vae": (VAETrainConfig, VAE_PRESETS),
    "fit-diffusion": (DiffusionTrainConfig, DIFFUSION_PRESETS),
    "distill": (DistillTrainConfig, None),
    "fit-detail": (DetailConfig, None),
}
SCOPES = ("cpu", "gpu", "paper", "else")
# Brackets with no value to check: a path, the recipe itself, or the preset's (its own test).
NOT_VALUES = {
    ("fit-vae", "--run"), ("fit-vae", "--preset"), ("fit-vae", "--steps"),
    ("fit-vae", "--image-blocks"), ("fit-vae", "--mask-blocks"), ("fit-diffusion", "--store"),
    ("fit-diffusion", "--preset"), ("fit-diffusion", "--steps"), ("fit-detail", "--scenes"),
}  # fmt: skip
# A value: a number, widths (32,64,64) or one word (auto, d4, fp32, v_prediction, off).
LITERAL = re.compile(r"-?[0-9][0-9.e+-]*|[0-9]+(,[0-9]+)+|[a-z][a-z0-9_]*")


def stated_defaults(help_text: str) -> list[tuple[str, str]]:
    """(scope, value) pairs of a help text's bracket: "[cpu 1e-3; else 4.5e-6 x batch, LDM]" ->
    [("cpu", "1e-3")]. Unscoped, the bracket's first clause is the value for every preset not
    named; later unscoped clauses and clauses that are not one value are comments."""
    found = re.search(r"\[([^\]]*)\]", help_text)
    if found is None:
        return []
    clauses = [part.strip() for group in found[1].split(";") for part in group.split(", ")]
    stated = []
    for position, clause in enumerate(clauses):
        scope, _, rest = clause.partition(" ")
        if scope not in SCOPES:
            scope, rest = ("all", clause) if position == 0 else ("comment", "")
        if LITERAL.fullmatch(rest):
            stated.append((scope, rest))
    return stated


def applies(scope: str, preset: str, named: set[str]) -> bool:
    return scope == preset or (scope in ("all", "else") and preset not in named)


def matches(value: Any, stated: str) -> bool:
    if stated == "off":
        return value in (False, None, 0)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) == stated
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value) == stated
    return float(value) == float(stated)


def trained_with(model: type[BaseModel], presets: Any) -> dict[str, BaseModel]:
    """The config each preset trains with when no option is given ("all": the config's own)."""
    if presets is None:
        return {"all": model()}
    return {name: model(**train_values(presets, name, Devices(), None, {})) for name in presets}


def field_of(option: str, model: type[BaseModel]) -> str | None:
    return next((field for field in model.model_fields if train_option(field) == option), None)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_default_in_brackets_is_what_the_presets_train_with(command: str) -> None:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    model, presets = COMMANDS[command]
    configs = trained_with(model, presets)
    checked = 0
    for param in group.commands[command].params:
        text = getattr(param, "help", None) or ""
        stated = stated_defaults(text)
        field = field_of(param.opts[0], model)
        if (command, param.opts[0]) in NOT_VALUES or "[" not in text:
            continue
        assert stated and field is not None, f"{param.opts[0]}: no default read from {text!r}"
        named = {scope for scope, _ in stated}
        for preset, config in configs.items():
            for scope, text in stated:
                if applies(scope, preset, named):
                    value = getattr(config, field)
                    assert matches(value, text), f"{param.opts[0]} says [{text}], {preset} {value}"
                    checked += 1
    assert checked >= len(configs), f"{command}: no default read from its --help"


def test_the_reader_of_brackets_reads_scopes_and_skips_comments() -> None:
    assert stated_defaults("Learning rate [cpu 1e-3; else 4.5e-6 x batch, LDM].") == [
        ("cpu", "1e-3")
    ]
    assert stated_defaults("Noise [5, Hang et al. 2023; paper 0].") == [
        ("all", "5"),
        ("paper", "0"),
    ]
    assert stated_defaults("Widths [cpu 32,64,64; else by latent size].") == [("cpu", "32,64,64")]
    assert stated_defaults("Widths [the preset's].") == []
    assert not matches(0.2, "0.1") and matches((8, 16), "8,16") and matches(None, "off")


# typer's own options, which its --help explains.
TYPER_OPTIONS = {"--install-completion", "--show-completion", "--help"}
# Options many commands share, which README describes once for all of them.
SHARED_OPTIONS = {"--quiet", "--json", "--threads", "--gpus", "--seed", "--batch-size", "--lr",
                  "--precision", "--overwrite", "--version"}  # fmt: skip


def readme_sections(readme: str) -> dict[str, str]:
    """Each command's README section: from its "### `specdm NAME" heading to the next heading."""
    heading = re.compile(r"^### `specdm ([a-z-]+)", re.MULTILINE)
    sections = {}
    for found in heading.finditer(readme):
        after = re.compile(r"^##+ ", re.MULTILINE).search(readme, found.end())
        sections[found[1]] = readme[found.start() : after.start() if after else len(readme)]
    return sections


def named(option: str, text: str) -> bool:
    return re.search(rf"{re.escape(option)}(?![\w-])", text) is not None


def test_every_option_of_every_command_is_named_in_its_readme_section() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    sections = readme_sections(readme)
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    commands = [("", group), *group.commands.items()]
    unnamed = [
        f"{name} {option}"
        for name, command in commands
        for param in command.params
        for option in param.opts
        if option.startswith("--") and option not in TYPER_OPTIONS
        if not named(option, readme if option in SHARED_OPTIONS else sections.get(name, ""))
    ]
    assert len(commands) > 8 and not unnamed, (
        f"options their README section does not name: {unnamed}"
    )
