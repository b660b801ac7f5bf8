"""Peak memory of one training step, measured the same way for every method.

The step is forward, backward and the optimizer update, run once to warm up (so the optimizer state
exists, as in steady-state training) and then metered. Two meters:

- **measured** (``measure_training_step``): on CUDA, ``torch.cuda.max_memory_allocated`` after a reset;
  on CPU, the exact peak of live tensor bytes: the bytes alive when the step starts (parameters,
  buffers, optimizer state, inputs) plus the highest running sum of the allocations and frees that
  PyTorch's profiler records during the step;
- **simulated** (``simulate_training_step``): the same two steps traced on fake tensors (no real
  memory is used), counting every storage from its creation to its release, so any model and
  resolution can be predicted on any machine.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepMemory:
    peak_bytes: int
    baseline_bytes: int  # alive before the step: weights, optimizer state, inputs
    step_seconds: float | None  # None for the simulated meter
    device: str


def adamw(parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.1)


def measure_training_step(
    model: nn.Module, loss_fn: LossFn, inputs: Sequence[Tensor], optimizer_factory: OptimizerFactory = adamw
) -> StepMemory:
    """Peak memory of ``loss_fn(model, inputs).backward(); optimizer.step()`` after one warm-up step.

    Only parameters with ``requires_grad`` are optimised; ``inputs`` count as alive at the step's start.
    """
    optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
    _step(model, loss_fn, inputs, optimizer)  # warm-up: allocates the optimizer state
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        _step(model, loss_fn, inputs, optimizer)
        torch.cuda.synchronize(device)
        return StepMemory(torch.cuda.max_memory_allocated(device), baseline, time.perf_counter() - started, str(device))
    baseline = live_bytes([*model.parameters(), *model.buffers(), *_optimizer_tensors(optimizer), *inputs])
    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        started = time.perf_counter()
        _step(model, loss_fn, inputs, optimizer)
        seconds = time.perf_counter() - started
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = highest = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        highest = max(highest, running)
    return StepMemory(baseline + highest, baseline, seconds, str(device))


def simulate_training_step(
    model: nn.Module, loss_fn: LossFn, inputs: Sequence[Tensor], optimizer_factory: OptimizerFactory = adamw
) -> StepMemory:
    """The same step as ``measure_training_step``, traced on fake copies of ``model`` and ``inputs``.

    Every storage an operation creates is counted until it is freed (no real memory is used), on top of
    the parameters, buffers and inputs; the optimizer state appears during the warm-up step.
    """
    mode = FakeTensorMode()
    with FakeCopyMode(mode):
        fake_model = copy.deepcopy(model)
    fake_inputs = [mode.from_tensor(tensor) for tensor in inputs]
    tracer = _StorageTracer()
    with mode, tracer:
        tracer.track([*fake_model.parameters(), *fake_model.buffers(), *fake_inputs])
        optimizer = optimizer_factory([p for p in fake_model.parameters() if p.requires_grad])
        _step(fake_model, loss_fn, fake_inputs, optimizer)
        baseline = tracer.peak = tracer.current
        _step(fake_model, loss_fn, fake_inputs, optimizer)
    device = next(fake_model.parameters()).device
    return StepMemory(tracer.peak, baseline, None, f"simulated {device}")


class _StorageTracer(TorchDispatchMode):
    """Counts the bytes of every live storage that operations create (and that ``track`` is given)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, tensors: Iterable[Tensor]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            size = storage.nbytes()
            self._seen[storage] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.track(t for t in tree_leaves(output) if isinstance(t, Tensor))
        return output


def live_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared storages counted once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _step(model: nn.Module, loss_fn: LossFn, inputs: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
    loss = loss_fn(model, inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del loss


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor)]


@contextmanager
def _quiet_profiler() -> Iterator[None]:
    """Silence the profiler's start/stop chatter on stderr (it writes there from C++)."""
    logger = logging.getLogger("torch.profiler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    stderr = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
            logger.setLevel(level)
