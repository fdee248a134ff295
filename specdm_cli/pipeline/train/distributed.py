"""Data-parallel training with torch.distributed: one process per device (NCCL on CUDA, gloo on CPU).

`--gpus 0,1` spawns one rank per CUDA device, `--gpus cpu:N` N CPU ranks (what CI tests);
under `torchrun` (RANK / WORLD_SIZE set) the ranks are torchrun's. Rank 0 alone writes.
Spawned ranks run under `pipeline.devices.run_spawned`, as synthesize's do.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from specdm_cli.pipeline.devices import run_spawned
from specdm_cli.pipeline.signals import StopFlag


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_ranks(
    worker: Callable[..., object], devices: list[torch.device], stop: StopFlag, *args: Any
) -> None:
    """Run `worker(rank, world, device, *args, stop)` on every rank (torchrun's, else one spawned
    process per device); returns when all finished, raises Interrupted when they stopped early.
    One device in-process is `driver.launch`'s."""
    if launched_by_torchrun():  # this process is a rank: the CLI's own stop flag is its own
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = devices[local % len(devices)]
        _init(
            rank,
            world,
            device,
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )
        _run(worker, rank, world, device, (*args, stop))
        return
    port = free_port()
    run_spawned(_spawned, len(devices), (worker, devices, port, args), stop)


def _spawned(
    rank: int,
    stop: StopFlag,
    worker: Callable[..., object],
    devices: list[torch.device],
    port: int,
    args: tuple[Any, ...],
) -> None:
    _init(rank, len(devices), devices[rank], "127.0.0.1", port)
    # The process group is left after the rank has told its outcome (`_spawned_rank`).
    worker(rank, len(devices), devices[rank], *args, stop)


def _init(rank: int, world: int, device: torch.device, address: str, port: int) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world
    )


def _run(
    worker: Callable[..., object],
    rank: int,
    world: int,
    device: torch.device,
    args: tuple[Any, ...],
) -> None:
    try:
        worker(rank, world, device, *args)
    finally:
        dist.destroy_process_group()


def stop_of_any_rank(signum: int | None) -> int | None:
    """The stop signal any rank was sent (None: none was), the same on every rank. The ranks
    must stop at the same step: one that stepped on alone would wait in DDP's all-reduce for
    ranks that had left."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signum
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def data_parallel(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Wrap in DistributedDataParallel when there are several ranks."""
    if world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    # A hint about speed, not numbers: a 1x1 convolution's grad may come out with other strides
    # than its bucket's (the same values); printed on a rank's stderr, it read as a failure.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )
