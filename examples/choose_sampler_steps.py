"""Choose the default step counts of the ODE samplers by measurement on the shipped demo model.

    python examples/choose_sampler_steps.py --task cd --n 256 --out /tmp/steps

Synthesizes `--n` samples with 1000-step DDPM (the paper's reference) and with `dpmpp`,
`unipc` and `ddim` over a ladder of step counts (and, with `--student RUN`, with the distilled
student of a copy of the demo run: `specdm distill RUN`), all with the same seed (so every sampler starts from the
same initial noise), compares each with the real test split of the demo store that
`examples/check_demo_models.py` uses, and prints fd_spectral, msad, pair mIoU and KID (the
small-N estimate, with its error bar) per row. A sampler's default is the fewest steps of the
ladder whose fd_spectral and msad are both within 10% of DDPM's (at most 1.1 x; better also
counts) and whose pair mIoU (how well the masks fit their images, issue 20) is at least 0.9 x
DDPM's.
Below 256 samples FD is dominated by its small-sample bias, so KID replaces it, with DDPM's KID
error bar added to the 10% allowance.

When no step count passes because DDPM-1000 is itself not the better reference (a model whose
ODE samples beat its DDPM samples on some figure and lose on another), the rule falls back to
convergence: the fewest steps within 10% of the same sampler at the top of the ladder, and says
so in its output.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from check_demo_models import prepare, synthesize_once

from specdm_cli.pipeline.benchmark.features import default_config, load_or_train
from specdm_cli.pipeline.benchmark.quality import compare_stores
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.synthesize.sampler import distilled_timesteps
from specdm_cli.stores import open_store

LADDER = (4, 5, 6, 8, 10, 20)
TOLERANCE = 1.10  # "within 10% of 1000-step DDPM"
PAIR_TOLERANCE = 0.90  # the same 10%, for a figure where higher is better (pair mIoU)
FD_MIN_SAMPLES = 256  # below this, KID (unbiased) stands in for fd_spectral


@dataclass(frozen=True)
class Row:
    """The figures of one (sampler, steps) against the real test split."""

    sampler: str
    steps: int
    fd_spectral: float
    msad: float
    pair_miou: float
    kid: float
    kid_std: float
    pairs_per_second: float
    n: int

    def within(self, reference: Row) -> bool:
        """msad and fd_spectral (KID below FD_MIN_SAMPLES) at most TOLERANCE x the reference's,
        pair mIoU at least PAIR_TOLERANCE x its."""
        if self.n >= FD_MIN_SAMPLES:
            distance = self.fd_spectral <= TOLERANCE * reference.fd_spectral
        else:
            allowance = (TOLERANCE - 1) * abs(reference.kid) + reference.kid_std
            distance = self.kid <= reference.kid + allowance
        pairs = self.pair_miou >= PAIR_TOLERANCE * reference.pair_miou
        return distance and pairs and self.msad <= TOLERANCE * reference.msad


def measure(
    task: str, sampler: str, steps: int, n: int, workdir: Path, threads: int, model: str = "demo"
) -> Row:
    """Synthesize (or reuse) one store and compare it with the real test split."""
    sha = choose_model(model, task).sha256[:12]  # a retrained model gets stores of its own
    out = workdir / f"{task}-{sampler}-{steps}-{n}-{sha}.zarr"
    summary = synthesize_once(out, "--model", model, "--task", task, "--n", str(n), "--sampler",
                              sampler, "--steps", str(steps), "--threads", str(threads))  # fmt: skip
    reference = open_store(prepare(task, workdir))
    network = load_or_train(reference, default_config(reference), workdir / "features")
    report = compare_stores(
        reference, open_store(out), network, reference_indices=reference.indices("test")
    )
    return Row(sampler, steps, report.fd_spectral, report.msad, report.pair_miou,
               report.kid_spectral,
               report.kid_spectral_std, float(summary["pairs_per_second"]), n)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ss", "cd"], default="cd")
    parser.add_argument("--n", type=int, default=256, help="samples per sampler setting")
    parser.add_argument("--ladder", default=",".join(map(str, LADDER)), help="step counts")
    parser.add_argument("--samplers", default="dpmpp,unipc,ddim")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for synthesize")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument(
        "--student", type=Path, default=None,
        help="a copy of the demo run after `specdm distill`: adds its distilled sampler's row",
    )  # fmt: skip
    args = parser.parse_args()
    workdir = args.out or Path(tempfile.mkdtemp(prefix="specdm-steps-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ladder = [int(s) for s in args.ladder.split(",")]
    ddpm = measure(args.task, "ddpm", 1000, args.n, workdir, args.threads)
    rows = [ddpm]
    chosen: dict[str, int | None] = {}
    converged: dict[str, tuple[int, int]] = {}  # sampler: (top of the ladder, fewest within it)
    for sampler in args.samplers.split(","):
        measured = [measure(args.task, sampler, k, args.n, workdir, args.threads) for k in ladder]
        rows += measured
        chosen[sampler] = next((r.steps for r in measured if r.within(ddpm)), None)
        if chosen[sampler] is None:
            converged[sampler] = (
                measured[-1].steps,
                next(r.steps for r in measured if r.within(measured[-1])),
            )
    if args.student:
        steps = len(distilled_timesteps(choose_model(str(args.student), args.task)))
        row = measure(args.task, "distilled", steps, args.n, workdir, args.threads,
                      str(args.student))  # fmt: skip
        rows.append(row)
        chosen["distilled"] = steps if row.within(ddpm) else None
    print(f"# task {args.task}, {args.n} samples each vs the real test split; "
          f"pass = {'fd_spectral' if args.n >= FD_MIN_SAMPLES else 'kid'} and msad within "
          f"{TOLERANCE} x ddpm-1000, pair_miou at least {PAIR_TOLERANCE} x")  # fmt: skip
    print(f"{'sampler':<8} {'steps':>5} {'fd_spectral':>11} {'msad':>8} {'pair':>6} {'kid':>8} "
          f"{'kid_std':>8} {'pairs/s':>8}  pass")  # fmt: skip
    for row in rows:
        mark = "ref" if row is ddpm else ("yes" if row.within(ddpm) else "no")
        print(f"{row.sampler:<8} {row.steps:>5} {row.fd_spectral:>11.4f} {row.msad:>8.4f} "
              f"{row.pair_miou:>6.3f} "
              f"{row.kid:>8.4f} {row.kid_std:>8.4f} {row.pairs_per_second:>8.1f}  {mark}")  # fmt: skip
    for sampler, fewest in chosen.items():
        print(f"# {sampler}: fewest passing steps = {fewest if fewest else 'none of the ladder'}")
    for sampler, (top, within) in converged.items():
        print(f"# {sampler}: fewest within {TOLERANCE} x its own {top} steps = {within}")


if __name__ == "__main__":
    main()
