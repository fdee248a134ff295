"""Train the VAE on a demo store with and without the SAD loss; print steps/s and Table 4 metrics.

Both runs use the same store, seed, budget and architecture, side by side in one invocation.

    python examples/bench_fit_vae.py [--steps 300] [--size 32] [--gpus 0 --precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def fit(store: Path, run: Path, args: argparse.Namespace, sad_weight: str) -> dict[str, object]:
    command = ["specdm", "fit-vae", str(store), "--run", str(run), "--steps", str(args.steps),
               "--val-every", str(args.steps), "--sad-weight", sad_weight, "--json", "--quiet",
               "--image-blocks", args.image_blocks, "--mask-blocks", args.mask_blocks,
               "--norm-groups", "8", "--batch-size", "16", "--lr", "2e-3", "--precision", args.precision]  # fmt: skip
    if args.gpus:
        command += ["--gpus", args.gpus]
    # A private user data dir: the benchmark's runs stay out of the user's registry.
    env = {**os.environ, "SPECDM_HOME": str(store.parent / "home")}
    summary: dict[str, object] = json.loads(
        subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--image-blocks", default="32,64,64")
    parser.add_argument("--mask-blocks", default="16,32,32")
    parser.add_argument("--gpus", default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--keep", action="store_true", help="keep the store and runs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="specdm-vae-"))
    try:
        bench(work, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, args: argparse.Namespace) -> None:
    store = work / "demo.zarr"
    subprocess.run(
        [
            "specdm",
            "prepare",
            "demo",
            "--n",
            str(args.n),
            "--size",
            str(args.size),
            "--out",
            str(store),
            "--quiet",
        ],
        check=True,
    )
    rows = {
        label: fit(store, work / label, args, weight)
        for label, weight in (("with SAD (0.1)", "0.1"), ("without SAD", "0"))
    }
    print(
        "| run | steps/s | RMSE (norm.) | RMSE (x1e4 refl.) | SAD (rad) | CE | mIoU |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for label, summary in rows.items():
        val = summary["validation"]
        assert isinstance(val, dict)
        print(
            f"| {label} | {summary['steps_per_second']} | {val['rmse']:.4f} | {val['rmse_physical']:.1f} | {val['sad']:.4f} | {val['ce']:.4f} | {val['miou']:.3f} |"
        )


if __name__ == "__main__":
    main()
