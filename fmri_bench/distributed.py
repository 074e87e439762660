"""Distributed set-up for training under ``torchrun``: one process per device.

In: the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets (absent: one process)
and the wanted device. Out: a ``Distributed`` (rank, world size, device, whether this process owns
the process group): NCCL with one GPU per rank, else gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """``obj`` of rank 0 on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the mean of ``t`` over ranks."""
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of ``t`` over ranks."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup(device: str = "auto") -> Distributed:
    """The process's place: one process unless torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if world == 1:
        return Distributed(device=torch.device("cuda" if want_cuda else device if device != "auto" else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), dev, owns)
