"""torch.distributed, as ``torchrun`` sets it up (never a home-made launcher).

Under ``torchrun --nproc_per_node N tunec run OUT`` every process reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment; the backend is
NCCL on CUDA and gloo on CPU. A plain ``tunec run`` is a world of one and
touches no process group at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t.tolist()


    def min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's ``value`` (each rank gets it)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())


def from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> None:
    if dist.active and not td.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown(dist: Dist) -> None:
    if dist.active and td.is_initialized():
        td.destroy_process_group()
