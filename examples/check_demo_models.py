"""Gate the shipped demo models: 512 samples per task against a fresh demo store's test split.

    python examples/check_demo_models.py --out /tmp/check-demo      # exit 1 if any figure fails
    python examples/check_demo_models.py --model-ss WORK/run-ss --model-cd WORK/run-cd  # retrained

For each task: prepares a demo store with the generator settings of
`examples/train_demo_models.sh` (seed 11, 64 px; more scenes, so that scenes 0..2047, the
training store, are its first ones and its val and test splits have about 512 scenes each and
were never trained on), synthesizes `--n` samples with the shipped model (`--model demo`) and the
default sampler, fits the metrics' feature network on the store's train split, and compares

- synthetic vs real test (the figures gated), and
- real val vs real test (two real halves of the same size: the floor the ratios refer to).

With `--utility` it also runs `specdm benchmark --downstream` (issue 20's protocol at its
defaults: 3 seeds, stopping on real val, 100 real train pairs, 5 synthetic pairs per real one)
and gates issue 20's two utility figures: the VAE round trip's utility against real only, and
real + synthetic (mixed, pretrain) against real only, pretrain also against its control.

Prints each figure beside its frozen threshold; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from specdm_cli.manifest import IMAGE_ARRAYS, LABEL_ARRAY
from specdm_cli.models.samplers import DEFAULT_STEPS
from specdm_cli.pipeline.benchmark.features import default_config, load_or_train
from specdm_cli.pipeline.benchmark.quality import QualityReport, compare_stores
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.runs.vae_io import load_vae
from specdm_cli.pipeline.train.common import load_batch, to_tensors
from specdm_cli.stores import StoreReader, open_store

# The generator settings of examples/train_demo_models.sh, with more scenes for the held-out
# splits (sample i depends only on (seed, i), so the training scenes are the first 2048).
DEMO_SEED = 11
DEMO_SIZE = 64
CHECK_SCENES = 5120

# Frozen thresholds: the values issue 6 suggests, fixed in this script before any model was
# evaluated with it, and not moved since. The real floor they sit above, measured by this script
# (real val vs real test, 517 vs 542 scenes): cd js_class 0.0000 bits, msad 0.0026 rad,
# pair_miou 0.958, fd_spectral 1.00; ss 0.0002, 0.0043, 0.907, 0.92 (examples/metrics_table.py
# shows which corruption moves which figure).
JS_CLASS_MAX = 0.05  # bits, Jensen-Shannon divergence of the class pixel fractions
MSAD_MAX = 0.05  # rad, mean over classes of the angle between mean spectra
PAIR_MIOU_MIN_RATIO = 0.6  # x the feature network's mIoU on real val (its own ceiling)
FD_SPECTRAL_MAX_RATIO = 3.0  # x fd_spectral of real val vs real test
# Issue 20's gates, frozen here (2026-12-03) as the issue states them: default pairs' pair mIoU
# at least 0.85 of real pairs'; a segmenter trained on the VAE's round trips of the real train
# pairs at least 0.95 of one trained on the real pairs; and real + synthetic better than real
# only by at least one spread, read as the larger of the two rows' standard deviations over
# the seeds (a gain smaller than either row's own seed-to-seed scatter is not one); pretrain
# also against its two-phase control, which the benchmark added the same day.
PAIR_MIOU_UTILITY_RATIO = 0.85
ROUND_TRIP_MIN_RATIO = 0.95
UTILITY_REAL_LIMIT = 100  # real train pairs: issue 20's "real limit 100"
GATED_PROTOCOLS = {"real", "round-trip", "mixed", "pretrain", "real-twice"}


@dataclass(frozen=True)
class Check:
    """One gated figure: the synthetic value, the threshold, and which side passes."""

    name: str
    value: float
    threshold: float
    at_most: bool

    @property
    def passed(self) -> bool:
        return self.value <= self.threshold if self.at_most else self.value >= self.threshold


def checks(synthetic: QualityReport, real: QualityReport) -> list[Check]:
    """The four gated figures of one task, thresholds resolved against the real halves."""
    return [
        Check("js_class (bits)", synthetic.js_class, JS_CLASS_MAX, True),
        Check("msad (rad)", synthetic.msad, MSAD_MAX, True),
        Check("pair_miou", synthetic.pair_miou, PAIR_MIOU_MIN_RATIO * real.pair_miou, False),
        Check(
            "pair_miou (#20)", synthetic.pair_miou, PAIR_MIOU_UTILITY_RATIO * real.pair_miou, False
        ),
        Check(
            "fd_spectral",
            synthetic.fd_spectral,
            FD_SPECTRAL_MAX_RATIO * real.fd_spectral,
            True,
        ),
    ]


def utility_checks(rows: dict[str, dict[str, Any]]) -> list[Check]:
    """Issue 20's utility gates from the downstream rows of a benchmark report, by protocol."""
    real = rows["real"]
    found = [
        Check("round-trip utility", rows["round-trip"]["miou"],
              ROUND_TRIP_MIN_RATIO * real["miou"], False),
    ]  # fmt: skip
    # Pretrain also against its control (the same two phases on real pairs alone): the gain
    # the synthetic pairs bring, not the second phase (benchmark's "real -> real" row).
    pairs = [("mixed", "real"), ("pretrain", "real"), ("pretrain", "real-twice")]
    for protocol, baseline in pairs:
        row, base = rows[protocol], rows[baseline]
        spread = max(row["miou_std"], base["miou_std"])
        found.append(Check(f"{protocol} - {baseline}", row["miou"] - base["miou"], spread, False))
    return found


def downstream_rows(task: str, model: str, real: Path, synthetic: Path, workdir: Path,
                    threads: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """`specdm benchmark --downstream` at the protocol's defaults (or its saved report): the
    rows by protocol, each printed with its seeds."""
    out = workdir / f"utility-{synthetic.stem}"
    if not _saved_rows(out / "report.json") >= GATED_PROTOCOLS:  # none, or one without a row
        specdm("benchmark", "--real", str(real), "--synthetic", str(synthetic), "--model", model,
               "--downstream", "--real-limit", str(UTILITY_REAL_LIMIT), "--threads", str(threads),
               "--out", str(out), "--overwrite", "--quiet")  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    rows = {row["protocol"]: row for row in report["downstream"]["rows"]}
    for row in rows.values():
        seeds = ", ".join(f"{run['miou']:.3f}" for run in row["seeds"])
        print(f"# {task}: downstream {row['name']}: {row['miou']:.3f} +- {row['miou_std']:.3f} "
              f"({seeds}; {row['real_count']} real, {row['synthetic_count']} synthetic)")  # fmt: skip
    return rows


def _saved_rows(report: Path) -> set[str]:
    """The protocols of the downstream rows a saved report holds (none if there is none)."""
    if not report.is_file():
        return set()
    return {row["protocol"] for row in json.loads(report.read_text())["downstream"]["rows"]}


def specdm(*args: str) -> str:
    """Run the real CLI (`python -m specdm_cli`), return its stdout."""
    command = [sys.executable, "-m", "specdm_cli", *args]
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def prepare(task: str, workdir: Path) -> Path:
    out = workdir / f"real-{task}.zarr"
    specdm("prepare", "demo", "--task", task, "--n", str(CHECK_SCENES), "--size", str(DEMO_SIZE),
           "--seed", str(DEMO_SEED), "--out", str(out), "--resume", "--quiet")  # fmt: skip
    return out


def synthesize_once(out: Path, *options: str) -> dict[str, Any]:
    """`specdm synthesize --out OUT OPTIONS --json`, or the summary saved by an earlier call."""
    summary = out.with_suffix(".summary.json")
    if not summary.is_file():
        summary.write_text(specdm("synthesize", "--out", str(out), *options, "--json", "--quiet"))
    result: dict[str, Any] = json.loads(summary.read_text())
    return result


def synthesize(task: str, model: str, n: int, workdir: Path, threads: int) -> tuple[Path, float]:
    """`n` samples of `model` (demo: the shipped one) with the default sampler; (store, pairs/s)."""
    # A retrained model or another default step count gets a store of its own.
    sha = choose_model(model, task).sha256[:12]
    out = workdir / f"syn-{task}-{n}-{sha}-dpmpp{DEFAULT_STEPS['dpmpp']}.zarr"
    options = ("--model", model, "--task", task, "--n", str(n), "--threads", str(threads))
    return out, float(synthesize_once(out, *options)["pairs_per_second"])


class RoundTrip:
    """A store read through a model's VAE: each sample encoded (posterior mean) and decoded,
    back in physical units and the store's dtype, the mask by argmax. Samples the diffusion
    model could at best reproduce: the VAE's ceiling on every figure."""

    def __init__(
        self, reader: StoreReader, task: str, model_name: str, indices: np.ndarray
    ) -> None:
        self._reader = reader
        model = choose_model(model_name, task)
        vae = load_vae(model.path, model.manifest, torch.device("cpu"))
        mean = torch.tensor(model.manifest.normalization.mean)
        std = torch.tensor(model.manifest.normalization.std)
        limits = np.iinfo(np.dtype(reader.manifest.dtype))
        self._samples: dict[int, dict[str, np.ndarray]] = {}
        with torch.no_grad():
            for start in range(0, indices.size, 32):
                chunk = indices[start : start + 32]
                arrays = load_batch(reader, chunk, None)
                batch, _ = to_tensors(arrays, reader.manifest.task, mean, std, torch.device("cpu"))
                decoded = vae.decode_joint(vae.encode_latent(batch))
                labels = vae.labels(decoded[LABEL_ARRAY[task]])
                for k, index in enumerate(chunk.tolist()):
                    sample = {LABEL_ARRAY[task]: labels[k].numpy()}
                    for name in IMAGE_ARRAYS[task]:
                        physical = decoded[name][k] * std[:, None, None] + mean[:, None, None]
                        sample[name] = physical.round().clamp(limits.min, limits.max).numpy()
                    self._samples[index] = sample

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def read(self, index: int) -> dict[str, np.ndarray]:
        original = self._reader.read(index)
        own = self._samples[index]
        return {key: own.get(key, value).astype(value.dtype) for key, value in original.items()}


def evaluate(
    task: str, model: str, n: int, workdir: Path, threads: int, ceiling: bool, utility: bool
) -> tuple[list[Check], float]:
    """The checks of one task and the measured pairs/s of its synthesis."""
    reference_path = prepare(task, workdir)
    reference = open_store(reference_path)
    synthetic_path, pairs_per_second = synthesize(task, model, n, workdir, threads)
    network = load_or_train(reference, default_config(reference), workdir / "features")
    test, val = reference.indices("test"), reference.indices("val")
    real = compare_stores(
        reference, reference, network, reference_indices=test, candidate_indices=val
    )
    synthetic = compare_stores(
        reference, open_store(synthetic_path), network, reference_indices=test
    )
    print(f"# {task}: {synthetic.candidate.count} synthetic, {val.size} real val, "
          f"{test.size} real test; feature network {network.feature_hash[:12]}")  # fmt: skip
    print(f"# {task}: real val vs test: js_class {real.js_class:.4f}, msad {real.msad:.4f}, "
          f"pair_miou {real.pair_miou:.3f}, fd_spectral {real.fd_spectral:.3f}")  # fmt: skip
    if ceiling:
        trip = RoundTrip(reference, task, model, val)
        vae = compare_stores(
            reference, cast(StoreReader, trip), network, reference_indices=test,
            candidate_indices=val,
        )  # fmt: skip
        print(f"# {task}: VAE round trip of real val vs test: js_class {vae.js_class:.4f}, "
              f"msad {vae.msad:.4f}, pair_miou {vae.pair_miou:.3f}, "
              f"fd_spectral {vae.fd_spectral:.3f}")  # fmt: skip
    found = checks(synthetic, real)
    if utility:
        rows = downstream_rows(task, model, reference_path, synthetic_path, workdir, threads)
        found += utility_checks(rows)
    return found, pairs_per_second


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ss", "cd", "both"], default="both")
    parser.add_argument("--n", type=int, default=512, help="synthetic samples per task")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for synthesize")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument(
        "--ceiling", action="store_true", help="also the figures of real val through the VAE"
    )
    parser.add_argument(
        "--utility", action="store_true", help="also issue 20's downstream gates (hours on CPU)"
    )
    for task in ("ss", "cd"):  # gate a retrained run before export_demo_models.py ships it
        parser.add_argument(f"--model-{task}", default="demo", help=f"{task} model [demo]")
    args = parser.parse_args()
    workdir = args.out or Path(tempfile.mkdtemp(prefix="specdm-check-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    failed = 0
    rows = []
    for task in ("ss", "cd") if args.task == "both" else (args.task,):
        model = getattr(args, f"model_{task}")
        results, pairs_per_second = evaluate(
            task, model, args.n, workdir, args.threads, args.ceiling, args.utility
        )
        rows += [(task, check) for check in results]
        print(f"# {task}: {pairs_per_second:.1f} pairs/s (default sampler, {args.threads} threads)")
    print(f"{'task':<5} {'figure':<16} {'value':>10} {'threshold':>12}  result")
    for task, check in rows:
        side = "<=" if check.at_most else ">="
        verdict = "pass" if check.passed else "FAIL"
        print(
            f"{task:<5} {check.name:<16} {check.value:>10.4f} {side} {check.threshold:>9.4f}  {verdict}"
        )
        failed += not check.passed
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
