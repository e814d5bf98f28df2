"""Several training processes, one model: DistributedDataParallel under `torchrun`.

    torchrun --nproc_per_node 4 -m model.train --cache storage/ --batch-scenes 8

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; `Distributed.from_environment` joins the
process group (NCCL on CUDA, gloo on the CPU) and gives each process its GPU. Without those
variables (a plain `python -m model.train`) everything here is a no-op for one process, so the
training loop has one code path.

What the loop does with it: each global batch of `--batch-scenes` scenes is split across the
processes (`shard`), DDP averages the gradients, the loss terms are rescaled so that the average
equals the mean over the whole global batch (`model.network.losses.rebalance_for_global_mean`), the
metrics are summed over processes, and only rank 0 validates and writes the run folder.

Which views a process sees: those of its own scenes. The CLIP consistency term is per view, so
its rebalanced mean over processes is the global batch's; `--clip-loss contrastive` takes its
negatives among the other scenes' views *on the same process*, never across processes (one
scene per process: no negatives).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from storage.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rank 0 validates alone while the others wait at a barrier: give it time on large val sets.
TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives' tensors live

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints, metrics and plots."""
        return self.rank == 0

    @staticmethod
    def from_environment(device: torch.device) -> Distributed:
        """Join the process group torchrun describes; `device` is the one the user asked for
        (cuda becomes cuda:LOCAL_RANK). One process when WORLD_SIZE is unset or 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return Distributed(device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        options = {}
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"process {local_rank} of this machine has no GPU (torch sees "
                                f"{torch.cuda.device_count()}): start at most that many with "
                                "torchrun --nproc_per_node")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            options["device_id"] = device  # binds NCCL to this GPU at once
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                                    rank=rank, world_size=world_size, **options)
        return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items`: every world_size-th one from its rank."""
        return list(items[self.rank::self.world_size])

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of `tensor` over all processes (a new tensor, same device)."""
        if not self.enabled:
            return tensor.clone()
        total = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.to(tensor.device)

    def all(self, flag: bool) -> bool:
        """True when `flag` is True in every process (every process gets the same answer)."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([0 if flag else 1], device=self.device)).item() == 0)

    def any(self, flag: bool) -> bool:
        """True when `flag` is True in some process."""
        return not self.all(not flag)

    def broadcast(self, make: Callable[[], T]) -> T:
        """`make()` as rank 0 computes it, on every process; a UserError raised there is
        raised on every process (so none waits for an answer that will not come)."""
        if not self.enabled:
            return make()
        message: list = [None]
        if self.is_main:
            try:
                message = [("ok", make())]
            except UserError as error:
                message = [("error", str(error))]
        dist.broadcast_object_list(message, src=0)
        kind, value = message[0]
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
