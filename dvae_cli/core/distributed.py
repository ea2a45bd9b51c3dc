"""torch.distributed under `torchrun`: one process per device, NCCL on GPUs, gloo on CPUs.

Everything here is a no-op in a single process, so the trainer and encoder read the same either way.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from dvae_cli.core.errors import UserError

T = TypeVar("T")

PROCESS_GROUP_TIMEOUT = timedelta(seconds=float(os.environ.get("DVAE_DIST_TIMEOUT", "120")))


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_cluster(device: torch.device) -> Cluster:
    """Join the process group torchrun set up (env://), or return the single-process cluster."""
    if not launched_by_torchrun():
        return Cluster()
    if dist.is_initialized():
        return Cluster(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (and all_gather_object) run on the current device
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    cluster = Cluster(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    _check_same_device_type(device)
    return cluster


def _check_same_device_type(device: torch.device) -> None:
    types = [None] * dist.get_world_size()
    dist.all_gather_object(types, device.type)
    if len(set(types)) > 1:
        raise UserError(f"ranks run on mixed device types {sorted(set(types))}; set runtime.device to the same "
                        "type on every node (cuda for NCCL, cpu for gloo)")


def leave_cluster() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite `tensor` in place with rank 0's copy (a no-op in one process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The global batch: every rank's equally shaped rows, concatenated in rank order (a no-op in one process)."""
    rank, world_size = world()
    if world_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


def select_global_rows(local: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (rank 0's choice) of the global batch whose slice [rank·M, (rank+1)·M) is `local` [M, ...].

    Only the chosen rows travel: each rank fills the ones it holds and the pieces are summed.
    """
    rank, world_size = world()
    if world_size == 1:
        return local[rows]
    rows = broadcast_from_rank0(rows.contiguous())
    mine = (rows >= rank * len(local)) & (rows < (rank + 1) * len(local))
    picked = torch.zeros((len(rows), *local.shape[1:]), dtype=local.dtype, device=local.device)
    picked[mine] = local[rows[mine] - rank * len(local)]
    return all_reduce_sum(picked)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def launch_with_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `dvae ARGV` (less --nproc) as `torchrun --standalone --nproc-per-node NPROC -m dvae_cli ARGV`.

    Returns the exit code of the first failed process (0 when all succeed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "dvae_cli", *_without_nproc(argv)])
    except ChildFailedError as failure:
        codes = [f.exitcode for f in failure.failures.values()]
        return next((code for code in codes if code == 2), codes[0] if codes else 1) or 1
    sys.stdout.flush()
    return 0


def all_gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] in one process."""
    _, world_size = world()
    if world_size == 1:
        return [value]
    values: list[T] = [value] * world_size
    dist.all_gather_object(values, value)
    return values
