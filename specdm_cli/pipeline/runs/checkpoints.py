"""Checkpoints as safetensors + JSON: sha256 of every weights file, atomic folders, no pickles."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specdm_cli.errors import ModelError
from specdm_cli.faults import fault_point
from specdm_cli.fs.atomic import atomic_write_text
from specdm_cli.fs.paths import file_sha256

# The hint of a damaged training state: resuming cannot use it, and the run folder exists.
AGAIN_FROM_THE_START = "train the stage again from the start: --overwrite in place of --resume"


def weights_digests(root: Path, folder: Path) -> dict[str, str]:
    """sha256 of every .safetensors file under `folder`, keyed by path relative to `root`."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


def verify_digests(root: Path, expected: dict[str, str]) -> None:
    """Refuse weights whose sha256 differs from what run.json recorded (exit 4)."""
    for relative, digest in expected.items():
        path = root / relative
        if not path.is_file():
            raise ModelError(
                "weights file listed in run.json is missing", path, "re-train or restore the run"
            )
        if file_sha256(path) != digest:
            raise ModelError(
                "weights do not match run.json (tampered or corrupt)",
                path,
                "re-train or restore the run",
            )


def save_module(module: Any, folder: Path) -> None:
    """A diffusers model as `config.json` + safetensors weights."""
    module.save_pretrained(folder, safe_serialization=True)
    # diffusers records the folder a model was loaded from: on a resumed run, a checkpoint
    # that is deleted once the new one is committed. The config needs no provenance of paths.
    config = folder / "config.json"
    values = json.loads(config.read_text(encoding="utf-8"))
    if values.pop("_name_or_path", None) is not None:
        atomic_write_text(config, json.dumps(values, indent=2, sort_keys=True) + "\n")


def unlisted_weights(root: Path, folder: Path, listed: dict[str, str]) -> list[str]:
    """Weights files under `folder` that run.json does not list (and so could not verify)."""
    return [
        str(p.relative_to(root))
        for p in sorted(folder.rglob("*.safetensors"))
        if str(p.relative_to(root)) not in listed
    ]


def is_disk_full(exc: BaseException) -> bool:
    """safetensors reports a full disk (or a file size limit) as its own error, by errno text."""
    text = str(exc)
    words = ("os error 28", "os error 27", "code: 28", "code: 27", "StorageFull", "FileTooLarge")
    return any(word in text for word in words)


def load_module(cls: Any, folder: Path) -> Any:
    """Load a diffusers model saved by `save_module`, offline, safetensors only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    # diffusers' warnings would be extra stderr lines; what they warn of is an error below.
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(
                folder, use_safetensors=True, low_cpu_mem_usage=False, output_loading_info=True
            )
    except MemoryError:
        raise
    except Exception as exc:
        # A damaged config.json or weights file fails anywhere inside diffusers (TypeError on a
        # config that is `null`, KeyError, RuntimeError on a shape): all mean "unusable folder".
        raise ModelError(
            f"cannot load model ({_first_line(exc)})", folder, "re-train or restore the run"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    wrong = _mistyped_config(cls, dict(model.config))
    if wrong:
        # diffusers builds some modules from such values and fails only at the first forward.
        raise ModelError(
            f"config.json has values of the wrong type: {', '.join(wrong[:3])}",
            folder,
            "re-train or restore the run",
        )
    # diffusers only warns when config.json builds another network than the weights describe.
    unmatched = [*info["missing_keys"], *info["unexpected_keys"], *info["mismatched_keys"]]
    if unmatched:
        raise ModelError(
            f"the weights do not fit config.json ({len(unmatched)} tensors differ)",
            folder,
            "re-train or restore the run",
        )
    return model


def _mistyped_config(cls: Any, config: dict[str, Any]) -> list[str]:
    """Config keys whose value is not of the kind of the constructor's scalar default (None
    for a number, text for a flag, ...); keys whose default is None or a sequence are free."""

    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "bool"
        return "number" if isinstance(value, int | float) else type(value).__name__

    parameters = inspect.signature(cls.__init__).parameters.items()
    return [
        name
        for name, parameter in parameters
        if name in config
        and isinstance(parameter.default, bool | int | float | str)
        and kind(config[name]) != kind(parameter.default)
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state: tensors in safetensors, the rest (param groups, scalars) in JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, folder / "optimizer.safetensors")
    fault_point("checkpoint.mid_write")  # weights and optimizer tensors on disk, not the rest
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    atomic_write_text(folder / "optimizer.json", json.dumps(meta))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what `save_optimizer` wrote."""
    try:
        tensors = load_file(folder / "optimizer.safetensors")
        meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        state: dict[int, dict[str, Any]] = {}
        for key, value in [*tensors.items(), *meta["scalars"].items()]:
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        _check_optimizer_state(optimizer, state, meta["param_groups"])
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (OSError, SafetensorError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelError(
            f"unreadable optimizer state ({_first_line(exc)})", folder, AGAIN_FROM_THE_START
        ) from None


def _check_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[int, dict[str, Any]], groups: Any
) -> None:
    """torch loads any state and fails (or trains wrongly) later: check it against the live one.

    The saved groups need the live groups' keys, parameters and kinds of value, and every
    per-parameter tensor the shape of its parameter.
    """
    live = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(live):
        raise ValueError("param_groups do not match the model")
    for saved, current in zip(groups, live, strict=True):
        if not isinstance(saved, dict) or saved.keys() != current.keys():
            raise ValueError("param_groups do not match the model")
        if saved["params"] != current["params"] or any(
            _kind(saved[k]) != _kind(current[k]) for k in current
        ):
            raise ValueError("param_groups do not match the model")
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    for index, slots in state.items():
        if not 0 <= index < len(shapes):
            raise ValueError(f"state for unknown parameter {index}")
        for name, value in slots.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shapes[index]:
                raise ValueError(f"state {index}.{name} has shape {tuple(value.shape)}")


def _kind(value: Any) -> Any:
    """What JSON keeps of a value's type: numbers are numbers, tuples are lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value)
    if isinstance(value, int | float):
        return float
    if isinstance(value, list | tuple):
        return [_kind(v) for v in value]
    return type(value)


def publish_folder(temp: Path, final: Path) -> None:
    """Move a fully written folder into place; `final` must not exist (`commit_checkpoint`
    picks a fresh name, so the folder run.json names stays until it names the new one)."""
    fault_point("checkpoint.before_publish")
    temp.rename(final)
