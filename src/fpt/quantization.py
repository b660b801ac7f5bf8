"""Int8 storage of cached features: symmetric int8 with one float16 scale per vector of the last dimension (per
token of each layer and head for keys/values), written by ``fpt.cache`` and read back one layer at a time by the
fusion module, so that an int8 cache is never expanded whole to float."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_int8(values: Tensor) -> tuple[Tensor, Tensor]:
    """values [..., d] (float32) -> (int8 [..., d], float16 scales [...]) with values ≈ int8 * scale, the scale
    the vector's largest magnitude / 127. An all-zero vector gets scale 0."""
    scales = (values.abs().amax(dim=-1) / 127).to(torch.float16)
    divisor = scales.float().unsqueeze(-1)
    quantized = torch.where(divisor > 0, values / divisor.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return quantized.round().clamp(-127, 127).to(torch.int8), scales


def dequantize(values: Tensor, scales: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``values`` in ``dtype``: int8 times their ``scales`` (one per vector of the last dimension), or as they
    are when ``scales`` is None (a floating cache)."""
    values = values.to(dtype)
    return values if scales is None else values * scales.to(dtype).unsqueeze(-1)
