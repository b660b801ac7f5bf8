"""What only a CUDA GPU can check (skipped without one; `benchmarks/gpu_check.sh` runs them): the same cached
features and gradients as on the CPU, and training under bf16 autocast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fpt.cache import FeatureCache
from fpt.config import TrainingConfig
from fpt.task import prepare
from fpt.train import train
from tests.pipeline_fixtures import all_keys, fast_training, preload_into, tiny_config

pytest_plugins = ("tests.pipeline_fixtures",)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_features_cached_on_the_gpu_match_the_cpus(tmp_path: Path, image_data: Path, tiny_lpm_dir: Path) -> None:
    dataset, model, normalization = prepare(image_data, tiny_config(tiny_lpm_dir), fast_training(None), False)
    preload_into(model, dataset, tmp_path / "cpu", normalization, dtype="float32", device="cpu")
    preload_into(model, dataset, tmp_path / "gpu", normalization, dtype="float32", device="cuda")

    cpu, gpu = FeatureCache.open(tmp_path / "cpu"), FeatureCache.open(tmp_path / "gpu")
    for key in all_keys(dataset):
        for name, part in cpu.get(key).items():
            torch.testing.assert_close(gpu.get(key)[name], part, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_fpt_plus_step_on_the_gpu_has_the_cpus_gradients(
    image_data: Path, tiny_lpm_dir: Path, precision: str
) -> None:
    _, model, _ = prepare(image_data, tiny_config(tiny_lpm_dir, num_classes=3), fast_training(None), False)
    generator = torch.Generator().manual_seed(0)
    side = torch.randn(4, 3, 32, 32, generator=generator)
    keys, values = (torch.randn(4, 2, 4, 5, 16, generator=generator) for _ in range(2))
    labels = torch.tensor([0, 1, 2, 1])

    def gradients(device: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        model.to(device).zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            logits = model(side.to(device), keys.to(device), values.to(device))
        torch.nn.functional.cross_entropy(logits.float(), labels.to(device)).backward()
        return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters() if p.grad is not None}

    reference = gradients("cpu", None)
    found = gradients("cuda", torch.bfloat16 if precision == "bf16" else None)
    tolerance = {"fp32": 1e-4, "bf16": 5e-2}[precision]
    for name, gradient in reference.items():
        torch.testing.assert_close(found[name], gradient, rtol=tolerance, atol=tolerance * gradient.abs().max().item())


def test_training_under_bf16_autocast_finishes_with_finite_metrics(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    training = TrainingConfig(
        epochs=2, batch_size=4, seed=0, device="cuda", precision="bf16", num_workers=0, cache_dir=str(tmp_path / "c")
    )
    results = train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)

    assert 0.0 <= results.last["auc"] <= 1.0
    assert all(math.isfinite(value) for value in results.last.values() if isinstance(value, float))
