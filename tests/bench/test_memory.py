"""The training-step memory meter on a model whose memory can be counted by hand."""

from __future__ import annotations

import torch
from torch import nn

from fpt.bench.memory import live_bytes, measure_training_step

MiB = 2**20


def test_live_bytes_counts_shared_storage_once() -> None:
    base = torch.zeros(1024, dtype=torch.float32)
    assert live_bytes([base, base[:10], base.view(32, 32)]) == 4096
    assert live_bytes([base, torch.zeros(10, dtype=torch.float16)]) == 4096 + 20


def test_cpu_peak_covers_weights_optimizer_state_inputs_and_gradients() -> None:
    model = nn.Linear(1024, 1024, bias=False)  # 4 MiB of weights
    inputs = torch.randn(64, 1024)  # 0.25 MiB
    optimizer = torch.optim.AdamW(model.parameters())

    result = measure_training_step(model, lambda: model(inputs).square().mean(), optimizer, [inputs])

    weights, state, batch = 4 * MiB, 8 * MiB, MiB // 4  # AdamW keeps two moments per weight (+ a step scalar)
    assert weights + state + batch <= result.baseline_bytes <= weights + state + batch + 1024
    # during the step the 4 MiB gradient (and small activations) come on top; AdamW's temporaries stay
    # within a few weight-sized buffers
    assert result.baseline_bytes + 4 * MiB <= result.peak_bytes <= result.baseline_bytes + 5 * 4 * MiB
    assert result.device == "cpu" and result.step_seconds > 0
