"""The linear probe on preloaded pooled embeddings: what is cached, its fingerprint, training, resume, loading."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fpt.cache import FeatureCache
from fpt.cli import main
from fpt.config import BackboneSpec, LinearProbeConfig, config_from_dict
from fpt.data.images import load_image
from fpt.data.loaders import Batch
from fpt.data.transforms import lpm_view
from fpt.errors import FPTError
from fpt.evaluate import evaluate_run
from fpt.models.backbone import load_backbone
from fpt.models.build import load_model
from fpt.models.linear_probe import EmbeddingStandardizer, LinearProbeModel
from fpt.predict import predict_images
from fpt.run import Run
from fpt.task import prepare
from fpt.train import resume, train
from tests.pipeline_fixtures import (
    CLASSES,
    LPM_INPUT_SIZE,
    NUM_IMAGES,
    all_keys,
    assert_features_equal,
    assert_same_run,
    fast_training,
    preload_into,
    read_json,
    reference_features,
    train_until_interrupted,
)

pytest_plugins = ("tests.pipeline_fixtures",)

WIDTH = 64  # the tiny LPM's


def probe_config(lpm_dir: Path, **overrides: Any) -> LinearProbeConfig:
    options = {"num_classes": 1, "lpm_input_size": LPM_INPUT_SIZE, **overrides}
    return LinearProbeConfig(backbone=BackboneSpec(str(lpm_dir)), **options)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_preload_stores_each_images_cls_token_and_mean_patch_token(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, dtype: str
) -> None:
    dataset, model, normalization = prepare(image_data, probe_config(tiny_lpm_dir), fast_training(None), False)
    preload_into(model, dataset, tmp_path / "cache", normalization, dtype=dtype, batch_size=1)

    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.layout.parts == {"embedding": (2 * WIDTH,)}
    assert cache.layout.nbytes == 2 * WIDTH * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    assert sorted(cache.entries) == sorted(all_keys(dataset))
    references = reference_features(model, dataset, normalization)
    for key in all_keys(dataset):
        assert_features_equal(cache.get(key), references[key], getattr(torch, dtype))

    # independently of PooledEncoder: the LPM's final normalised tokens, CLS then the mean of the patches
    lpm = load_backbone(BackboneSpec(str(tiny_lpm_dir))).eval()
    key = all_keys(dataset)[0]
    with torch.no_grad():
        tokens = lpm.forward_features(lpm_view(LPM_INPUT_SIZE, normalization)(load_image(dataset.root / key))[None])
    expected = torch.cat([tokens[0, 0], tokens[0, 1:].mean(dim=0)])
    assert_features_equal(cache.get(key), {"embedding": expected}, getattr(torch, dtype))


def test_the_fingerprint_records_the_pooling_and_another_pooling_is_refused(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    training = fast_training(tmp_path / "cache", epochs=1)
    train(image_data, tmp_path / "run", probe_config(tiny_lpm_dir), training, progress=False)
    fingerprint = FeatureCache.open(tmp_path / "cache").fingerprint
    assert fingerprint["pooling"] == "cls+mean" and fingerprint["lpm_input_size"] == LPM_INPUT_SIZE
    assert read_json(tmp_path / "run" / "run.json")["cache_fingerprint"] == fingerprint

    with pytest.raises(FPTError, match=r"pooling: cache has 'cls\+mean', this run needs 'mean'.*--overwrite"):
        train(image_data, tmp_path / "other", probe_config(tiny_lpm_dir, pooling="mean"), training, progress=False)


def test_a_cached_probe_trains_only_its_head_and_predicts_like_its_test_results(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    training = fast_training(tmp_path / "cache", cache_dtype="float32")
    results = train(image_data, tmp_path / "run", probe_config(tiny_lpm_dir), training, progress=False)

    cache = FeatureCache.open(tmp_path / "cache")
    assert len(cache) == NUM_IMAGES
    weights = load_file(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "head.weight": (len(CLASSES), 2 * WIDTH),
        "head.bias": (len(CLASSES),),
        "norm.count": (),
        "norm.mean": (2 * WIDTH,),
        "norm.sum_squares": (2 * WIDTH,),
    }
    # the standardisation's statistics are the training embeddings', each seen once per epoch
    run = Run.load(tmp_path / "run")
    embeddings = torch.stack([cache.get(sample.path)["embedding"] for sample in run.dataset.splits["train"]])
    assert weights["norm.count"].item() == training.epochs * len(embeddings)
    torch.testing.assert_close(weights["norm.mean"], embeddings.mean(dim=0), atol=1e-5, rtol=1e-5)
    variance = weights["norm.sum_squares"] / weights["norm.count"]
    torch.testing.assert_close(variance, embeddings.var(dim=0, unbiased=False), atol=1e-5, rtol=1e-4)
    assert evaluate_run(tmp_path / "run", checkpoint="last", device="cpu") == results.last

    # predict runs the LPM on the fly; from a float32 cache the probabilities agree with the test predictions
    test = run.dataset.splits["test"]
    images = [run.dataset.root / sample.path for sample in test]
    predicted = predict_images(tmp_path / "run", images, "last", "cpu", progress=False)
    lines = (tmp_path / "run" / "predictions" / "test_last.csv").read_text().splitlines()[1:]
    for line, prediction in zip(lines, predicted, strict=True):
        recorded = [float(value) for value in line.split(",")[-len(CLASSES) :]]
        assert prediction.probabilities == pytest.approx(recorded, abs=1e-5)


def test_an_interrupted_cached_probe_resumes_to_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    config, training = probe_config(tiny_lpm_dir), fast_training(tmp_path / "cache", epochs=3)
    reference = train(image_data, tmp_path / "reference", config, training, progress=False)
    train_until_interrupted(monkeypatch, image_data, tmp_path / "interrupted", config, training)
    time.sleep(1.0)  # TensorBoard event files are ordered by their names' whole-second timestamps

    assert resume(tmp_path / "interrupted", progress=False) == reference
    assert_same_run(tmp_path / "interrupted", tmp_path / "reference")


def test_a_linear_probe_saved_by_fpt_0_1_0_loads_as_a_cls_probe(tmp_path: Path, tiny_lpm_dir: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    old_config = {"method": "linear", "backbone": {"name": str(tiny_lpm_dir), "weights": None, "model_kwargs": {}}}
    old_config |= {"num_classes": 3, "lpm_input_size": LPM_INPUT_SIZE, "class_names": None}
    (directory / "config.json").write_text(json.dumps(old_config))
    weight, bias = torch.randn(3, WIDTH), torch.randn(3)
    save_file({"backbone.head.weight": weight, "backbone.head.bias": bias}, directory / "model.safetensors")

    model = load_model(directory)

    assert isinstance(model, LinearProbeModel) and model.config.pooling == "cls"
    assert model.config.feature_norm == "none"  # it was trained on the raw embedding
    images = torch.randn(2, 3, LPM_INPUT_SIZE, LPM_INPUT_SIZE)
    lpm = load_backbone(BackboneSpec(str(tiny_lpm_dir))).eval()
    with torch.no_grad():
        expected = F.linear(lpm.forward_features(images)[:, 0], weight, bias)
        got = model.eval().logits(Batch(label=torch.zeros(2, dtype=torch.long), index=torch.arange(2), lpm=images))
    torch.testing.assert_close(got, expected)
    assert config_from_dict({**old_config, "pooling": "mean"}).pooling == "mean"  # a written field is kept


def test_the_standardizer_gives_the_statistics_of_everything_it_saw_and_takes_batches_of_one() -> None:
    embeddings = torch.randn(37, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0]) + 7.0
    standardizer = EmbeddingStandardizer(5).train()
    for batch in (embeddings[:1], embeddings[1:17], embeddings[17:]):
        standardizer(batch)

    standardized = standardizer.eval()(embeddings)
    torch.testing.assert_close(standardized.mean(dim=0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardized.std(dim=0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    assert standardizer(embeddings[:3]).equal(standardized[:3])  # eval mode reads the statistics, never adds to them


def test_a_raw_probe_saves_only_its_head(tmp_path: Path, image_data: Path, tiny_lpm_dir: Path) -> None:
    training = fast_training(tmp_path / "cache", epochs=1)
    train(image_data, tmp_path / "run", probe_config(tiny_lpm_dir, feature_norm="none"), training, progress=False)

    weights = load_file(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors")
    assert sorted(weights) == ["head.bias", "head.weight"]
    assert read_json(tmp_path / "run" / "run.json")["model"]["feature_norm"] == "none"
    with pytest.raises(FPTError, match="feature_norm must be one of"):
        probe_config(tiny_lpm_dir, feature_norm="batchnorm")


def test_cli_info_counts_the_probe_and_its_cached_bytes(capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path) -> None:
    args = ["info", "--backbone", str(tiny_lpm_dir), "--method", "linear", "--num-classes", "3"]
    assert main([*args, "--input-size", str(LPM_INPUT_SIZE), "--pooling", "cls", "--json"]) == 0

    info = json.loads(capsys.readouterr().out)
    assert info["learnable_params"] == WIDTH * 3 + 3
    expected = {"float32": WIDTH * 4, "bfloat16": WIDTH * 2, "float16": WIDTH * 2, "int8": WIDTH + 2}  # + its scale
    assert info["cached_bytes_per_image"] == expected
    assert "num_prompts" not in info and "tokens_kept_per_layer" not in info


def test_cli_preload_and_train_the_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path, tiny_lpm_dir: Path
) -> None:
    common = ["--backbone", str(tiny_lpm_dir), "--method", "linear", "--input-size", str(LPM_INPUT_SIZE)]
    common += ["--cache", str(tmp_path / "cache"), "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    assert main(["preload", str(image_data), *common]) == 0
    assert f"{NUM_IMAGES} images computed, 0 already cached" in capsys.readouterr().out

    assert main(["train", str(image_data), "--run", str(tmp_path / "run"), "--epochs", "1", *common]) == 0

    run = read_json(tmp_path / "run" / "run.json")
    assert run["model"]["pooling"] == "cls+mean" and run["model"]["feature_norm"] == "standardize"
    assert run["cache_fingerprint"] == FeatureCache.open(tmp_path / "cache").fingerprint

    # the raw probe reads the same cache: standardising is the probe's, not the cache's
    args = ["train", str(image_data), "--run", str(tmp_path / "raw"), "--epochs", "1", "--feature-norm", "none"]
    assert main([*args, *common]) == 0
    raw = read_json(tmp_path / "raw" / "run.json")
    assert raw["model"]["feature_norm"] == "none" and raw["cache_fingerprint"] == run["cache_fingerprint"]
