"""torch.distributed under `torchrun`: one process per device, NCCL on GPUs, gloo on CPUs.

Everything here is a no-op in a single process, so the trainer and encoder read the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dvae_cli.errors import UserError

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
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    cluster = Cluster(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    _check_same_device_type(device)
    return cluster


def _check_same_device_type(device: torch.device) -> None:
    types = [None] * dist.get_world_size()
    dist.all_gather_object(types, device.type)
    if len(set(types)) > 1:
        raise UserError(f"ranks run on mixed device types {sorted(set(types))}; set train.device to the same "
                        "type on every node (cuda for NCCL, cpu for gloo)")


def leave_cluster() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process); returns it."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
