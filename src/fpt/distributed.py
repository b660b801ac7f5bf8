"""Several processes, one job: the ranks that ``torchrun`` starts, on PyTorch's own distributed engine.

``torchrun --nproc_per_node N -m fpt preload ...`` (or ``train``) sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` for each process; ``ranks()`` reads them and joins the process group on first use (NCCL when the
job runs on CUDA GPUs, gloo otherwise). Without torchrun it is a single rank and every call here is a no-op, so
the library runs the same code either way.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fpt.errors import FPTError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs, reports and the merged cache index."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            dist.barrier()

    def all_gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def device_name(self, requested: str) -> str:
        """The device this rank runs on: with ``auto`` and CUDA GPUs, its own GPU (``cuda:LOCAL_RANK``)."""
        if self.distributed and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested


def ranks(device: str = "auto") -> Ranks:
    """This process's ranks, from the variables torchrun sets; joins the process group the first time, with NCCL
    when ``device`` resolves to CUDA GPUs, else gloo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    try:
        current = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError):
        raise FPTError("WORLD_SIZE is set but RANK is not; start distributed jobs with torchrun") from None
    if not dist.is_initialized():
        use_cuda = current.device_name(device).startswith("cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(current.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return current
