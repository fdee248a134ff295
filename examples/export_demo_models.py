"""Copy the sampling parts of the demo runs into specdm_cli/assets/demo-<task>/.

Keeps run.json and the final checkpoint's sampling weights (VAE branches, EMA U-Net); drops
training state (optimizer, raw U-Net), metrics and the latent cache, stores the kept weights as
fp16 (half the bytes; the loader builds fp32 modules from them, so sampling runs in fp32 as
before) and lists only the kept files' sha256 in run.json, so the shipped model verifies like
any run.

    python examples/export_demo_models.py WORKDIR [ASSETS]     (ASSETS: default the package's)

Exports each of WORKDIR's run-ss and run-cd that exists.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file, save_file

from specdm_cli.pipeline.runs.checkpoints import weights_digests
from specdm_cli.pipeline.runs.run_manifest import load_run, save_run
from specdm_cli.pipeline.runs.vae_io import BRANCHES, LABEL_TO_IMAGE

ASSETS = Path(__file__).resolve().parents[1] / "specdm_cli" / "assets"
KEEP = {"vae": (*BRANCHES, LABEL_TO_IMAGE), "diffusion": ("unet",)}


def to_fp16(folder: Path) -> None:
    """Rewrite every floating tensor of the safetensors files under `folder` as fp16."""
    for path in folder.rglob("*.safetensors"):
        tensors = load_file(path)
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        save_file(half, path, metadata={"format": "pt"})
        assert all(torch.isfinite(v).all() for v in half.values()), f"{path}: fp16 overflow"


def export(run: Path, target: Path) -> None:
    manifest = load_run(run)
    before = {name: dict(stage.weights) for name, stage in manifest.stages.items()}
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name, stage in manifest.stages.items():
        assert stage.checkpoint is not None and stage.finished, f"{run}: {name} is not finished"
        for part in KEEP[name]:
            source = run / stage.checkpoint / part
            if source.is_dir():
                shutil.copytree(source, target / stage.checkpoint / part)
                to_fp16(target / stage.checkpoint / part)
        stage.weights = weights_digests(target, target / stage.checkpoint)
    # A stage names the weights it was made from (the U-Net its VAE's, a student its teacher's):
    # they are the fp16 copies now.
    for name, key, made_from in (
        ("diffusion", "vae_weights", "vae"),
        ("distill", "teacher_weights", "diffusion"),
    ):
        details = manifest.stages[name].details if name in manifest.stages else {}
        if details.get(key) == before.get(made_from):
            details[key] = manifest.stages[made_from].weights
    manifest.source_store = (
        f"demo scenes (examples/train_demo_models.sh), run {run.name}, fp16 weights"
    )
    save_run(target, manifest)
    assert load_run(target).can_sample()  # verifies every digest and that the stages still match


def main() -> None:
    work = Path(sys.argv[1])
    # Another folder than the package's lets CI run the recipe without replacing the shipped models.
    assets = Path(sys.argv[2]) if len(sys.argv) > 2 else ASSETS
    # The runs WORKDIR holds: a recipe run for one task replaces that task's model only.
    tasks = [task for task in ("ss", "cd") if (work / f"run-{task}").is_dir()]
    assert tasks, f"{work} holds no run-ss or run-cd"
    for task in tasks:
        export(work / f"run-{task}", assets / f"demo-{task}")
        size = sum(p.stat().st_size for p in (assets / f"demo-{task}").rglob("*") if p.is_file())
        print(f"demo-{task}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
