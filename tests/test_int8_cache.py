"""The int8 cache: symmetric int8 keys/values with a float16 scale per token, dequantised one layer at a time in the
fusion module; bounded error against float32, the record's bytes, and training from it."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fpt.bench.memory import measure_training_step
from fpt.cache import FeatureCache, RecordLayout
from fpt.cli import main
from fpt.models.fusion import FPTPlusFusion, PromptCrossAttention
from fpt.quantization import dequantize, quantize_int8
from fpt.task import prepare
from tests.conftest import randomize_
from tests.pipeline_fixtures import all_keys, cli_model_args, cli_run_args, fast_training, preload_into, tiny_config

pytest_plugins = ("tests.pipeline_fixtures",)


def test_quantisation_error_is_at_most_half_a_step_per_vector() -> None:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 3, 50, 16, generator=generator) * torch.logspace(-3, 2, 50)[:, None]  # tokens' scales vary
    values[0, 0, 0] = 0.0  # an all-zero vector

    quantized, scales = quantize_int8(values)

    assert quantized.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == values.shape[:-1]
    assert quantized.abs().max() <= 127 and scales[0, 0, 0] == 0
    error = (dequantize(quantized, scales) - values).abs()
    step = scales.float().unsqueeze(-1)
    largest = values.abs().amax(dim=-1, keepdim=True)
    assert (error <= step / 2 + largest * 2**-10).all()  # half a step, plus the float16 rounding of the scale
    assert dequantize(values, None).equal(values)


def test_int8_cross_attention_equals_the_float_computation_on_the_dequantised_tokens() -> None:
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(3, 4, 5, 8, generator=generator, requires_grad=True)
    keys, values = (torch.randn(2, 3, 4, 7, 8, generator=generator) for _ in range(2))
    (keys_int8, keys_scale), (values_int8, values_scale) = quantize_int8(keys), quantize_int8(values)
    upstream = torch.randn(2, 3, 5, 32, generator=generator)

    int8 = PromptCrossAttention.apply(queries, keys_int8, values_int8, keys_scale, values_scale)
    (int8_gradient,) = torch.autograd.grad((int8 * upstream).sum(), queries)
    dequantised = (dequantize(keys_int8, keys_scale), dequantize(values_int8, values_scale))
    reference = PromptCrossAttention.apply(queries, *dequantised, None, None)
    (reference_gradient,) = torch.autograd.grad((reference * upstream).sum(), queries)

    torch.testing.assert_close(int8, reference)
    torch.testing.assert_close(int8_gradient, reference_gradient)


def test_fpt_plus_logits_from_int8_keys_values_stay_within_a_bound_of_float32(
    image_data: Path, tiny_lpm_dir: Path
) -> None:
    # a randomised model (every weight of order one: more sensitive than a trained one) on random tokens
    _, model, _ = prepare(image_data, tiny_config(tiny_lpm_dir, num_classes=3), fast_training(None), False)
    model = randomize_(model, seed=3).eval()
    generator = torch.Generator().manual_seed(2)
    side = torch.randn(64, 3, 32, 32, generator=generator)
    keys, values = (torch.randn(64, 2, 4, 5, 16, generator=generator) * 2 for _ in range(2))
    (keys_int8, keys_scale), (values_int8, values_scale) = quantize_int8(keys), quantize_int8(values)
    with torch.no_grad():
        reference = model(side, keys, values)
        found = model(side, keys_int8, values_int8, keys_scale, values_scale)
        float16 = model(side, keys.half(), values.half())

    error = (found - reference).abs()
    assert error.max() <= 0.1 * reference.std(), (error.max(), reference.std())
    assert error.mean() <= 0.02 * reference.std(), (error.mean(), reference.std())
    assert error.mean() <= 40 * (float16 - reference).abs().mean()  # int8 steps are 2**-7, float16's 2**-11
    assert (found.argmax(dim=1) == reference.argmax(dim=1)).float().mean() >= 0.95


def test_an_int8_cache_stores_a_quarter_of_float32_plus_the_scales_and_trains(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    dataset, model, normalization = prepare(image_data, tiny_config(tiny_lpm_dir), fast_training(None), False)
    preload_into(model, dataset, tmp_path / "int8", normalization, dtype="int8")
    preload_into(model, dataset, tmp_path / "float32", normalization, dtype="float32")

    int8, float32 = FeatureCache.open(tmp_path / "int8"), FeatureCache.open(tmp_path / "float32")
    shape = model.feature_layout()["keys"]  # [L, H, T, d_head]
    assert int8.layout.nbytes == 2 * math.prod(shape) + 2 * 2 * math.prod(shape[:-1])
    assert int8.layout.nbytes == RecordLayout(model.feature_layout(), "int8").nbytes
    assert float32.layout.nbytes == 4 * 2 * math.prod(shape)
    for key in all_keys(dataset):
        record = int8.get(key)
        assert sorted(record) == ["keys", "keys_scale", "values", "values_scale"]
        assert record["keys"].dtype == torch.int8 and record["keys_scale"].shape == shape[:-1]
        exact = float32.get(key)
        for name in ("keys", "values"):
            step = record[f"{name}_scale"].float().unsqueeze(-1)
            assert ((dequantize(record[name], record[f"{name}_scale"]) - exact[name]).abs() <= step).all()

    args = ["train", str(image_data), "--run", str(tmp_path / "run"), "--epochs", "1", "--cache-dtype", "int8"]
    assert main([*args, *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "int8")]) == 0


def test_the_int8_fusion_step_never_holds_a_float_copy_of_the_whole_cache() -> None:
    fusion = randomize_(FPTPlusFusion(6, 4, lpm_dim=64, num_heads=4, side_dim=8), seed=0).train()
    generator = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(8, 6, 4, 200, 16, generator=generator) for _ in range(2))
    (keys, keys_scale), (values, values_scale) = quantize_int8(keys), quantize_int8(values)

    def loss(module: FPTPlusFusion, inputs: list[torch.Tensor]) -> torch.Tensor:
        return module(*inputs).square().sum()

    memory = measure_training_step(fusion, loss, [keys, values, keys_scale, values_scale])
    int8_bytes = keys.nbytes + values.nbytes
    assert memory.peak_bytes - memory.baseline_bytes < 2 * int8_bytes  # a float32 copy of both would be 4x
