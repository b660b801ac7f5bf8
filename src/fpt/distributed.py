"""Several processes, one job: the ranks that ``torchrun`` starts, on PyTorch's own distributed engine.

``torchrun --nproc_per_node N -m fpt preload ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` for each
process; ``ranks()`` reads them and joins the process group on first use (NCCL when the job runs on CUDA GPUs,
gloo otherwise). Without torchrun it is a single rank and every call here runs its action directly, so the
library runs the same code either way. The collective helpers turn an ``FPTError`` raised on one rank into the
same error on every rank, so that a job stops everywhere with one message instead of hanging in a barrier.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fpt.errors import FPTError

T = TypeVar("T")


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
        """More than one process (under torchrun)."""
        return self.world_size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run ``action`` on rank 0 while the others wait; its result on rank 0, None elsewhere. An ``FPTError``
        (or ``OSError``) it raises is raised as an ``FPTError`` on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except (FPTError, OSError) as failure:
                if not self.distributed:
                    raise
                error = str(failure)
        error = self.broadcast(error)
        if error is not None:
            raise FPTError(error)
        return result

    def each(self, action: Callable[[], T]) -> list[T]:
        """Run ``action`` on every rank; every rank's result, in rank order, on every rank. An ``FPTError`` (or
        ``OSError``) raised on any rank is raised as an ``FPTError`` on every rank, once all have finished."""
        if not self.distributed:
            return [action()]
        try:
            outcome: tuple[Any, str | None] = (action(), None)
        except (FPTError, OSError) as failure:
            outcome = (None, str(failure))
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, outcome)
        for _, error in gathered:
            if error is not None:
                raise FPTError(error)
        return [result for result, _ in gathered]

    def share(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items: shares differ in size by at most one, are never padded,
        and in rank order make up ``range(count)`` (a rank may get none)."""
        return range(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over the ranks, on every rank (in place)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace the gradient of each trainable parameter by its sum over the ranks, in one all-reduce. A rank
        where a parameter has no gradient (it saw no sample this step) adds zeros; a parameter without a gradient
        on every rank keeps none, as in one process (the optimizer then skips it)."""
        if not self.distributed:
            return
        trainable = [parameter for parameter in parameters if parameter.requires_grad]
        present = [float(parameter.grad is not None) for parameter in trainable]
        flat = torch.cat(
            [
                *((p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in trainable),
                torch.tensor(present, dtype=trainable[0].dtype, device=trainable[0].device),
            ]
        )
        dist.all_reduce(flat)
        *gradients, counts = flat.split([*(p.numel() for p in trainable), len(trainable)])
        for parameter, gradient, count in zip(trainable, gradients, counts.tolist(), strict=True):
            parameter.grad = gradient.view_as(parameter) if count > 0 else None

    def device_name(self, requested: str) -> str:
        """The device this rank runs on: with ``auto`` or ``cuda`` and CUDA GPUs, its own (``cuda:LOCAL_RANK``)."""
        if not self.distributed or not torch.cuda.is_available() or requested not in ("auto", "cuda"):
            if self.distributed and requested.startswith("cuda:"):
                raise FPTError(f"under torchrun each process takes its own GPU; pass --device cuda, not {requested}")
            return requested
        if self.local_rank >= torch.cuda.device_count():
            raise FPTError(
                f"torchrun started more processes on this machine than it has GPUs ({torch.cuda.device_count()}); "
                "pass --nproc_per_node with at most that many"
            )
        return f"cuda:{self.local_rank}"


ONE_PROCESS = Ranks()  # a job of one process: every collective is the identity


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
        use_cuda = current.device_name(device).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(current.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(dist.destroy_process_group)
    return current


def refuse_under_torchrun(command: str) -> None:
    """Raise for a command that runs in one process only, when started by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FPTError(
            f"{command} runs in one process (it trains several runs one after the other): start it without "
            "torchrun; `fpt preload` and `fpt train` are the commands that run under torchrun"
        )
