"""Device choice, mixed precision and seeding, shared by preloading, training and prediction."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from fpt.config import Precision
from fpt.errors import FPTError

T = TypeVar("T")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other name is used as given (``cuda:1``, ``cpu``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FPTError(f"unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FPTError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision on GPUs (bf16 or fp16); fp32, or any precision on CPU, runs unchanged."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Full precision inside an autocast region. Only CUDA's autocast is switched off explicitly: older torch
    versions reject ``torch.autocast`` on some other devices (mps), where fpt never enables autocast anyway."""
    if device_type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", enabled=False)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (library calls that train say that they do)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for one part of a run (an epoch, a sample, a rank), distinct for distinct parts in practice."""
    for part in parts:
        seed = (seed * 1_000_003 + part) % 2**63
    return seed


def progress_bar(iterable: Iterable[T] | None = None, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar with rate and ETA; shown on terminals only, so logs and CI output stay clean."""
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **options)
