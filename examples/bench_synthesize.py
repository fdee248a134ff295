"""Synthesis speed, quality and memory of a shipped demo model, side by side in one run.

    python examples/bench_synthesize.py --task cd --out /tmp/bench-syn
    python examples/bench_synthesize.py --task cd --gpu        # on a CUDA machine: adds bf16 --n 10000

Prints, for the default sampler and for 1000-step DDPM (the paper's reference): pairs/s and their
ratio, fd_spectral, mSAD and KID against the demo store's real test split (the store and feature
network of `examples/check_demo_models.py`), and the share of wall time the background writer
was busy and the share sampling waited for it. Then the peak RSS of `synthesize` at two sizes
(default 256 and 4096; these runs use `--rss-steps` sampler steps, since memory does not depend
on the step count and the point is that it stays flat in --n). Then the thread settings (as
the machine is, and with one busy process per core started here; `--only threads`), and speed
ratios (`--only speed`): the tool against a bare in-process sample+decode loop, decoding B=64 in
chunks against at once, and pairs/s of dpmpp 10, unipc 5 and, with `--student RUN` (a run after
`specdm distill`), the distilled student. Every pairs/s figure comes from the real CLI in a child
process; peak RSS and CPU time are the child's own, from wait4.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from check_demo_models import prepare

from specdm_cli.fs.atomic import remove_tree
from specdm_cli.models.samplers import DEFAULT_STEPS
from specdm_cli.pipeline.benchmark.features import default_config, load_or_train
from specdm_cli.pipeline.benchmark.quality import compare_stores
from specdm_cli.pipeline.runs.choose import choose_model
from specdm_cli.pipeline.synthesize.sampler import CPU_DECODE_CHUNK, Sampler, SamplingPlan
from specdm_cli.stores import create_store, open_store, open_writer
from specdm_cli.stores.base import SampleMeta, StoreWriter

MODULE = ("-m", "specdm_cli")
# Loads torch before specdm_cli, so OpenMP starts with torch's own waits (what specdm did before
# it chose sleeping ones): libgomp spins about 3 ms before sleeping.
TORCH_FIRST = (
    "-c",
    "import runpy, torch; runpy.run_module('specdm_cli', run_name='__main__', alter_sys=True)",
)


@dataclass(frozen=True)
class Synthesis:
    """One `specdm synthesize --json` call: its summary and the child's peak RSS."""

    summary: dict[str, Any]
    peak_rss_mib: float
    cpu_seconds: float  # the whole child: imports, sampling, writing

    @property
    def pairs_per_second(self) -> float:
        return float(self.summary["pairs_per_second"])

    def share(self, key: str) -> float:
        return float(self.summary[key]) / max(float(self.summary["seconds"]), 1e-9)


def synthesize(
    out: Path, *options: str, env: dict[str, str] | None = None, launcher: tuple[str, ...] = MODULE
) -> Synthesis:
    """Run the real CLI in a child process; peak RSS and CPU time from the kernel's accounting
    of that child."""
    command = [sys.executable, *launcher, "synthesize", "--out", str(out), *options]
    command += ["--overwrite", "--json", "--quiet"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"synthesize failed with exit {child.returncode}: {' '.join(command)}")
    cpu_seconds = usage.ru_utime + usage.ru_stime
    return Synthesis(json.loads(stdout), usage.ru_maxrss / 1024, cpu_seconds)  # ru_maxrss: KiB


def quality(reference_path: Path, candidate: Path, workdir: Path) -> dict[str, float]:
    """fd_spectral, msad and KID of `candidate` against the real test split."""
    reference = open_store(reference_path)
    network = load_or_train(reference, default_config(reference), workdir / "features")
    report = compare_stores(
        reference, open_store(candidate), network, reference_indices=reference.indices("test")
    )
    return {
        "fd_spectral": report.fd_spectral,
        "msad": report.msad,
        "kid": report.kid_spectral,
        "kid_std": report.kid_spectral_std,
    }


def compare_samplers(args: argparse.Namespace, workdir: Path) -> None:
    common = ("--model", "demo", "--task", args.task, "--seed", "0", "--threads", str(args.threads))
    reference = prepare(args.task, workdir)
    rows = {
        "default (dpmpp)": synthesize(
            workdir / "default.zarr", *common, "--n", str(args.quality_n)
        ),
        "ddpm 1000": synthesize(
            workdir / "ddpm.zarr", *common, "--n", str(args.ddpm_n), "--sampler", "ddpm"
        ),
    }
    print(f"# {args.task}, demo model, {args.threads} threads; quality vs {reference.name} test")
    print("| sampler | n | pairs/s | fd_spectral | msad (rad) | KID | writer busy | waited |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in rows.items():
        figures = quality(reference, Path(run.summary["out"]), workdir)
        print(
            f"| {name} | {run.summary['n']} | {run.pairs_per_second:.3f} "
            f"| {figures['fd_spectral']:.2f} | {figures['msad']:.4f} "
            f"| {figures['kid']:.4f} ± {figures['kid_std']:.4f} "
            f"| {run.share('write_seconds'):.1%} | {run.share('write_wait_seconds'):.1%} |"
        )
    ratio = rows["default (dpmpp)"].pairs_per_second / rows["ddpm 1000"].pairs_per_second
    print(f"\nspeed-up of the default sampler over 1000-step DDPM: {ratio:.1f}x")


def bare_loop(model: str, task: str, n: int, plan: SamplingPlan) -> float:
    """Pairs/s of sampling and decoding in this process, with no store, writer or CLI."""
    sampler = Sampler(choose_model(model, task), plan, torch.device("cpu"))
    sampler.batch(0, 1, DEFAULT_STEPS["dpmpp"])  # warm-up: allocations, thread pools
    started = time.perf_counter()
    for first in range(0, n, plan.batch_size):
        sampler.batch(first, min(plan.batch_size, n - first), DEFAULT_STEPS["dpmpp"])
    return n / (time.perf_counter() - started)


def decode_seconds(sampler: Sampler, latents: torch.Tensor, chunk: int) -> float:
    """Seconds per sample to decode `latents` in chunks of `chunk`."""
    sampler.plan = dataclasses.replace(sampler.plan, decode_chunk=chunk)
    started = time.perf_counter()
    with torch.no_grad():
        sampler.decode(latents)
    return (time.perf_counter() - started) / len(latents)


def compare_speed(args: argparse.Namespace, workdir: Path) -> None:
    """The tool against a bare in-process loop, decoding chunked or whole, and the samplers'
    pairs/s, all with `--threads` threads."""
    torch.set_num_threads(args.threads)
    n, threads = str(args.speed_n), ("--threads", str(args.threads))
    common = ("--model", "demo", "--task", args.task, "--n", n, *threads)
    tools, bares = [], []
    for _ in range(2):  # interleaved, best of 2: the machine's load moves between them
        tools.append(synthesize(workdir / "speed.zarr", *common))
        bares.append(bare_loop("demo", args.task, args.speed_n, SamplingPlan()))
    tool, bare = max(tools, key=lambda run: run.pairs_per_second), max(bares)
    print(f"\n# speed ({args.task}, n={args.speed_n}, {args.threads} threads)")
    print(f"tool / bare sample+decode loop: {tool.pairs_per_second / bare:.2f} "
          f"({tool.pairs_per_second:.2f} vs {bare:.2f} pairs/s)")  # fmt: skip
    sampler = Sampler(choose_model("demo", args.task), SamplingPlan(batch_size=64),
                      torch.device("cpu"))  # fmt: skip
    latents = torch.randn(64, sampler.channels, sampler.side, sampler.side)
    whole, chunked = [], []
    for _ in range(3):  # interleaved, best of 3
        whole.append(decode_seconds(sampler, latents, 64))
        chunked.append(decode_seconds(sampler, latents, CPU_DECODE_CHUNK))
    print(f"decoding B=64 in chunks of {CPU_DECODE_CHUNK} / at once, time per sample: "
          f"{min(chunked) / min(whole):.2f} ({min(chunked) * 1e3:.1f} vs "
          f"{min(whole) * 1e3:.1f} ms)")  # fmt: skip
    rows = {"dpmpp 10 (default)": tool}
    rows["unipc 5"] = synthesize(workdir / "unipc.zarr", *common, "--sampler", "unipc",
                                 "--steps", "5")  # fmt: skip
    if args.student:
        student = ("--model", str(args.student), "--task", args.task, "--n", n, *threads)
        rows["distilled"] = synthesize(workdir / "student.zarr", *student, "--sampler", "distilled")
    print("| sampler | steps | pairs/s | vs default |")
    print("|---|---|---|---|")
    for name, run in rows.items():
        steps = json.loads((Path(run.summary["out"]) / "manifest.json").read_text())["model"]
        print(f"| {name} | {steps['steps']} | {run.pairs_per_second:.2f} "
              f"| {run.pairs_per_second / tool.pairs_per_second:.2f} |")  # fmt: skip


def compare_memory(args: argparse.Namespace, workdir: Path) -> None:
    common = ("--model", "demo", "--task", args.task, "--steps", str(args.rss_steps))
    small, large = args.rss_n
    runs = [
        synthesize(workdir / f"rss-{n}.zarr", *common, "--n", str(n), "--threads", "2")
        for n in (small, large)
    ]
    print(f"\n# peak RSS ({args.rss_steps} dpmpp steps)")
    print("| n | peak RSS (MiB) | pairs/s | writer busy |")
    print("|---|---|---|---|")
    for n, run in zip((small, large), runs, strict=True):
        print(
            f"| {n} | {run.peak_rss_mib:.0f} | {run.pairs_per_second:.1f} "
            f"| {run.share('write_seconds'):.1%} |"
        )
    print(f"\nRSS ratio n={large} / n={small}: {runs[1].peak_rss_mib / runs[0].peak_rss_mib:.2f}x")


THREAD_SETTINGS: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
    # label: (synthesize options, environment overrides, how python starts the CLI)
    "--threads 1": (["--threads", "1"], {}, MODULE),
    "--threads 2": (["--threads", "2"], {}, MODULE),
    "default": ([], {}, MODULE),
    "default, spinning 0.1 ms (GOMP_SPINCOUNT=10000)": ([], {"GOMP_SPINCOUNT": "10000"}, MODULE),
    "default, torch's own OpenMP waits (before)": ([], {}, TORCH_FIRST),
    "default, spinning always (OMP_WAIT_POLICY=ACTIVE)": (
        [],
        {"OMP_WAIT_POLICY": "ACTIVE"},
        MODULE,
    ),
}


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """`count` processes that each keep one core busy, as other jobs on a shared host do."""
    spin = "while True: pass"
    children = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for child in children:
            child.kill()
            child.wait()


def compare_threads(args: argparse.Namespace, workdir: Path) -> None:
    """Pairs/s and CPU seconds per pair of each thread setting, on the machine as it is and with
    one busy process per core started here; settings interleaved, best of `--thread-rounds`."""
    common = ("--model", "demo", "--task", args.task, "--n", str(args.thread_n))
    cores = len(os.sched_getaffinity(0))
    results: dict[tuple[str, str], list[Synthesis]] = {}
    for load, busy in (("as is", 0), (f"{cores} busy processes", cores)):
        with busy_cores(busy):
            for _ in range(args.thread_rounds):
                for label, (options, env, launcher) in THREAD_SETTINGS.items():
                    out = workdir / "threads.zarr"
                    environment = {**os.environ, **env}
                    run = synthesize(out, *common, *options, env=environment, launcher=launcher)
                    results.setdefault((load, label), []).append(run)
    print(f"\n# threads ({cores} CPUs; n={args.thread_n}, best of {args.thread_rounds})")
    print("| machine | setting | pairs/s | CPU s / pair | pairs/s vs the best setting |")
    print("|---|---|---|---|---|")
    for load in dict.fromkeys(key[0] for key in results):
        best = {label: max(runs, key=lambda r: r.pairs_per_second)
                for (where, label), runs in results.items() if where == load}  # fmt: skip
        top = max(run.pairs_per_second for run in best.values())
        for label, run in best.items():
            print(
                f"| {load} | {label} | {run.pairs_per_second:.2f} "
                f"| {run.cpu_seconds / run.summary['n']:.3f} | {run.pairs_per_second / top:.2f} |"
            )


def gpu_run(args: argparse.Namespace, workdir: Path) -> None:
    run = synthesize(
        workdir / "gpu.zarr", "--model", "demo", "--task", args.task, "--n", "10000",
        "--gpus", "0", "--precision", "bf16",
    )  # fmt: skip
    peak = run.summary.get("cuda_peak_bytes") or 0
    print("\n# GPU: --n 10000 --precision bf16 --gpus 0 (default sampler, batch auto)")
    print(
        f"{run.pairs_per_second:.1f} pairs/s, {run.summary['seconds']:.0f} s, "
        f"peak CUDA memory {peak / 2**20:.0f} MiB, peak RSS {run.peak_rss_mib:.0f} MiB, "
        f"writer busy {run.share('write_seconds'):.1%}"
    )


def write_pairs_per_second(store: Path, workdir: Path, per_sample: bool, n: int) -> float:
    """Pairs/s of writing n samples of `store` in batches of 64 into a new store like it."""
    source = open_store(store)
    samples = [source.read(index) for index in range(64)]
    batch = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    metas = [SampleMeta("synthetic", np.zeros(len(source.manifest.classes))) for _ in samples]
    out = workdir / "written.zarr"
    remove_tree(out)
    create_store(out, source.manifest, n, georeferenced=False)
    writer = open_writer(out, source.manifest)
    started = time.perf_counter()
    for first in range(0, n, 64):
        count = min(64, n - first)  # the last batch of an n that 64 does not divide
        part = {name: values[:count] for name, values in batch.items()}
        if per_sample:
            StoreWriter.write_batch(writer, first, part)  # one zarr call per sample and array
        else:
            writer.write_batch(first, part)
        writer.mark_written(first, metas[:count])
    return n / (time.perf_counter() - started)


def compare_writing(args: argparse.Namespace, workdir: Path) -> None:
    """The store writer alone: one slab per batch against one write per sample (what
    synthesize did before), interleaved, best of 3, at 64 and 128 px."""
    print(f"\n# writing {args.write_n} cd pairs into a Zarr store (batch 64, best of 3)")
    print("| tile | per sample (pairs/s) | one slab per batch (pairs/s) | ratio |")
    print("|---|---|---|---|")
    for size in (64, 128):
        store = workdir / f"write-{size}.zarr"
        subprocess.run([sys.executable, *MODULE, "prepare", "demo", "--task", "cd", "--n", "64",
                        "--size", str(size), "--out", str(store), "--overwrite", "--quiet"],
                       check=True)  # fmt: skip
        slab, loop = [], []
        for _ in range(3):
            loop.append(write_pairs_per_second(store, workdir, True, args.write_n))
            slab.append(write_pairs_per_second(store, workdir, False, args.write_n))
        print(f"| {size} px | {max(loop):.0f} | {max(slab):.0f} | {max(slab) / max(loop):.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["ss", "cd"], default="cd")
    parser.add_argument("--quality-n", type=int, default=256, help="default-sampler samples")
    parser.add_argument("--ddpm-n", type=int, default=64, help="DDPM samples (slow on CPU)")
    parser.add_argument(
        "--rss-n", type=int, nargs=2, default=[256, 4096], metavar=("SMALL", "LARGE")
    )
    parser.add_argument("--rss-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--thread-n", type=int, default=64, help="samples per thread setting")
    parser.add_argument("--thread-rounds", type=int, default=2)
    parser.add_argument(
        "--only", choices=["samplers", "memory", "threads", "speed", "writing"], default=None,
        help="one section",
    )  # fmt: skip
    parser.add_argument("--speed-n", type=int, default=128, help="samples per speed row")
    parser.add_argument("--write-n", type=int, default=512, help="samples per writing row")
    parser.add_argument("--student", type=Path, default=None, help="a run after specdm distill")
    parser.add_argument("--gpu", action="store_true", help="also --n 10000 bf16 on CUDA device 0")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: temp)")
    args = parser.parse_args()
    workdir = args.out or Path(tempfile.mkdtemp(prefix="specdm-bench-syn-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sections = {"samplers": compare_samplers, "memory": compare_memory,
                "threads": compare_threads, "speed": compare_speed,
                "writing": compare_writing}  # fmt: skip
    for name, section in sections.items():
        if args.only in (None, name):
            section(args, workdir)
    if args.gpu:
        gpu_run(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
