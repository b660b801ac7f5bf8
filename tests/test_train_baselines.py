"""The baselines end to end on the tiny data: training (no feature cache), their augmented high-resolution view,
evaluation, resume, and the `fpt train` / `fpt info` / `fpt predict` commands."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from fpt.cli import main
from fpt.config import METHOD_CONFIGS, METRIC_NAMES, MethodConfig, TrainingConfig
from fpt.data.loaders import Batch, start_epoch
from fpt.evaluate import evaluate_run
from fpt.models.backbone import BackboneSpec
from fpt.models.baselines import BASELINE_METHODS
from fpt.models.build import load_model
from fpt.predict import predict_images
from fpt.run import Run
from fpt.task import prepare
from fpt.train import resume, train
from tests.pipeline_fixtures import (
    CLASSES,
    LPM_INPUT_SIZE,
    SPLIT_SIZES,
    assert_same_run,
    cli_run_args,
    fast_training,
    metric_lines,
    one_line_error,
    read_json,
    tiny_config,
    train_until_interrupted,
)

pytest_plugins = ("tests.pipeline_fixtures",)

OPTIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "vpt-deep": {"num_prompts": 2},
    "lora": {"rank": 2},
    "adapter": {"bottleneck_dim": 8},
}
# the tiny LPM (64 wide, 4 blocks, MLP 256 wide, patch 16, 64 px: 1 + 16 tokens) and a 3-class head
WIDTH, DEPTH, HEAD = 64, 4, 64 * 3 + 3
LPM_BLOCK = (
    2 * WIDTH + (WIDTH * 192 + 192) + (WIDTH * WIDTH + WIDTH) + 2 * WIDTH + (WIDTH * 256 + 256) + (256 * 64 + 64)
)
LPM_PARAMS = (3 * 16 * 16 * WIDTH + WIDTH) + WIDTH + 17 * WIDTH + DEPTH * LPM_BLOCK + 2 * WIDTH  # without a head


def baseline_config(method: str, lpm_dir: Path, **overrides: Any) -> MethodConfig:
    """``method`` on the tiny LPM at its 64 px input, with small method options."""
    options = {"num_classes": 1, "lpm_input_size": LPM_INPUT_SIZE, **OPTIONS[method], **overrides}
    return METHOD_CONFIGS[method](backbone=BackboneSpec(str(lpm_dir)), **options)


def cache_is_absent_or_empty(cache_dir: Path) -> bool:
    return not cache_dir.exists() or not any(cache_dir.iterdir())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_lpm_dir: Path, image_data: Path) -> Path:
    """A finished two-epoch LoRA run (read only)."""
    directory = tmp_path_factory.mktemp("lora_run")
    config = baseline_config("lora", tiny_lpm_dir)
    train(image_data, directory / "run", config, fast_training(directory / "cache"), progress=False)
    return directory / "run"


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_each_baseline_trains_without_a_feature_cache_and_its_run_evaluates_to_its_results(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, method: str
) -> None:
    training = fast_training(tmp_path / "cache")

    results = train(image_data, tmp_path / "run", baseline_config(method, tiny_lpm_dir), training, progress=False)

    assert cache_is_absent_or_empty(tmp_path / "cache")
    run = read_json(tmp_path / "run" / "run.json")
    assert run["model"]["method"] == method
    assert run["model"]["num_classes"] == len(CLASSES)
    assert run["model"]["class_names"] == list(CLASSES)
    assert {key: run["model"][key] for key in OPTIONS[method]} == OPTIONS[method]
    assert run["cache_fingerprint"] is None
    lines = metric_lines(tmp_path / "run")
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor([line["train_loss"], line["val_loss"]])).all() for line in lines)

    assert read_json(tmp_path / "run" / "results.json") == results.to_dict()
    assert results.best_epoch in (1, 2)
    for name in ("best", "last"):
        assert getattr(results, name)["num_samples"] == len(CLASSES) * SPLIT_SIZES["test"]
        assert {*METRIC_NAMES, "loss", "confusion_matrix"} <= getattr(results, name).keys()
        checkpoint = tmp_path / "run" / "checkpoints" / name
        assert {"config.json", "model.safetensors"} <= {path.name for path in checkpoint.iterdir()}
        # only the trained weights are stored, and they are exactly what the restored model trains
        weights = load_file(checkpoint / "model.safetensors")
        assert set(weights) == set(load_model(checkpoint).trainable_state_dict())
    assert {"optimizer.safetensors", "state.json"} <= {p.name for p in (tmp_path / "run/checkpoints/last").iterdir()}

    assert evaluate_run(tmp_path / "run", checkpoint="best", device="cpu") == results.best
    assert evaluate_run(tmp_path / "run", checkpoint="last", device="cpu") == results.last


def _run(tmp_path: Path, image_data: Path, config: MethodConfig, training: TrainingConfig) -> Run:
    """A run set up as `train` sets it up, without training."""
    dataset, model, normalization = prepare(image_data, config, training, progress=False)
    return Run(tmp_path / "run", model.config, training, str(image_data), normalization, dataset, None)


def _views_by_index(loader: DataLoader, epoch: int | None = None) -> dict[int, dict[str, Any]]:
    """One pass of ``loader`` (a training loader in epoch ``epoch``), item by item."""
    if epoch is not None:
        start_epoch(loader, epoch)
    items = {}
    for batch in loader:
        for row, index in enumerate(batch.index.tolist()):
            items[index] = {key: value[row] for key, value in _present(batch).items()}
    return items


def _present(batch: Batch) -> dict[str, torch.Tensor]:
    """The fields of ``batch`` that hold tensors, by name."""
    return {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baseline_loaders_yield_the_lpm_view_augmented_for_training_and_plain_for_evaluation(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, method: str
) -> None:
    training = fast_training(tmp_path / "cache")
    run = _run(tmp_path, image_data, baseline_config(method, tiny_lpm_dir), training)
    cache = run.open_cache()
    assert cache is None
    train_loader = run.loader("train", cache, shuffle=True)

    batch = next(iter(train_loader))
    assert set(_present(batch)) == {"index", "label", "lpm"}  # no side view, no cached keys/values
    assert batch.lpm.shape == (training.batch_size, 3, LPM_INPUT_SIZE, LPM_INPUT_SIZE)
    first_epoch = _views_by_index(train_loader, epoch=0)
    second_epoch = _views_by_index(train_loader, epoch=1)  # the augmentation draws again
    assert len(first_epoch) == len(CLASSES) * SPLIT_SIZES["train"]
    for index, item in first_epoch.items():
        assert not torch.equal(item["lpm"], second_epoch[index]["lpm"]), index
        assert torch.equal(item["lpm"], _views_by_index(train_loader, epoch=0)[index]["lpm"])  # seeded by epoch

    val_loader = run.loader("val", cache)
    first, again = _views_by_index(val_loader), _views_by_index(val_loader)
    assert set(next(iter(first.values()))) == {"index", "label", "lpm"}
    for index, item in first.items():
        assert torch.equal(item["lpm"], again[index]["lpm"])
    plain_train = _views_by_index(run.loader("train", cache))  # evaluating train: plain views too
    plain_again = _views_by_index(run.loader("train", cache))
    assert all(torch.equal(item["lpm"], plain_again[index]["lpm"]) for index, item in plain_train.items())


def test_fpts_lpm_view_stays_plain_in_training_while_its_side_view_is_augmented(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    run = _run(tmp_path, image_data, tiny_config(tiny_lpm_dir), fast_training(None))
    train_loader = run.loader("train", None, shuffle=True)

    first, second = _views_by_index(train_loader, epoch=0), _views_by_index(train_loader, epoch=1)

    assert set(next(iter(first.values()))) == {"index", "label", "lpm", "side"}
    for index, item in first.items():
        assert torch.equal(item["lpm"], second[index]["lpm"])  # cacheable: never augmented
        assert not torch.equal(item["side"], second[index]["side"])


def test_an_interrupted_lora_run_resumes_to_the_same_metrics_results_and_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    config = baseline_config("lora", tiny_lpm_dir)
    training = fast_training(tmp_path / "cache", epochs=3)
    reference = train(image_data, tmp_path / "reference", config, training, progress=False)

    train_until_interrupted(monkeypatch, image_data, tmp_path / "interrupted", config, training)

    resumed = resume(tmp_path / "interrupted", progress=False)

    # TensorBoard events are left out: see test_train.py on event files written within the same second
    assert resumed == reference
    assert_same_run(tmp_path / "interrupted", tmp_path / "reference")
    assert cache_is_absent_or_empty(tmp_path / "cache")


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_trains_lora_with_the_given_rank_and_alpha(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path, tiny_lpm_dir: Path
) -> None:
    args = ["train", str(image_data), "--run", str(tmp_path / "run"), "--backbone", str(tiny_lpm_dir)]
    args += ["--method", "lora", "--lora-rank", "2", "--lora-alpha", "4", "--input-size", str(LPM_INPUT_SIZE)]
    args += ["--epochs", "1", *cli_run_args(tmp_path / "cache")]

    assert main(args) == 0

    assert f"run written to {tmp_path / 'run'}" in capsys.readouterr().out
    model = read_json(tmp_path / "run" / "run.json")["model"]
    assert (model["method"], model["rank"], model["alpha"]) == ("lora", 2, 4.0)
    weights = load_file(tmp_path / "run" / "checkpoints" / "best" / "model.safetensors")
    assert weights["backbone.blocks.0.attn.qkv.lora_a"].shape == (2, WIDTH)
    assert cache_is_absent_or_empty(tmp_path / "cache")


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("lora", "--side-input-size", "16"),
        ("lora", "--num-prompts", "4"),
        ("adapter", "--lora-rank", "4"),
        ("linear", "--adapter-dim", "8"),
        ("full", "--token-ratio", "0.5"),
        ("vpt-deep", "--lora-alpha", "2"),
        ("fpt+", "--lora-rank", "2"),
    ],
)
def test_cli_refuses_an_option_the_method_does_not_have_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    tiny_lpm_dir: Path,
    method: str,
    option: str,
    value: str,
) -> None:
    args = ["train", str(image_data), "--run", str(tmp_path / "run"), "--backbone", str(tiny_lpm_dir)]
    args += ["--method", method, option, value, "--epochs", "1", *cli_run_args(tmp_path / "cache")]

    assert main(args) == 1

    error = one_line_error(capsys)
    assert error == f"fpt: error: --method {method} has no {option}; drop the option or pick another method"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("method", "options", "learnable", "frozen"),
    [
        ("adapter", ["--adapter-dim", "8"], HEAD + DEPTH * (WIDTH * 8 + 8 + 8 * WIDTH + WIDTH), LPM_PARAMS),
        ("lora", ["--lora-rank", "2"], HEAD + DEPTH * 2 * (WIDTH + 3 * WIDTH), LPM_PARAMS),
        ("vpt-deep", ["--num-prompts", "5"], HEAD + DEPTH * 5 * WIDTH, LPM_PARAMS),
        ("full", [], LPM_PARAMS + HEAD, 0),
    ],
)
def test_cli_info_json_counts_the_baselines_by_hand(
    capsys: pytest.CaptureFixture[str],
    tiny_lpm_dir: Path,
    method: str,
    options: list[str],
    learnable: int,
    frozen: int,
) -> None:
    args = ["info", "--backbone", str(tiny_lpm_dir), "--method", method, *options, "--num-classes", "3"]

    assert main([*args, "--input-size", str(LPM_INPUT_SIZE), "--json"]) == 0

    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method
    assert info["learnable_params"] == learnable
    assert info["frozen_params"] == info["frozen_params_without_head"] == frozen
    assert info["learnable_ratio"] == pytest.approx(learnable / (learnable + frozen))
    assert info["lpm_tokens"] == 1 + (LPM_INPUT_SIZE // 16) ** 2
    assert not {"side_input_size", "side_width", "cached_bytes_per_image", "tapped_layers"} & info.keys()
    assert main([*args, "--input-size", str(LPM_INPUT_SIZE)]) == 0  # the table shows the same count
    assert f"{learnable:,}" in capsys.readouterr().out


def test_cli_predict_of_a_baseline_run_matches_its_test_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lora_run: Path
) -> None:
    data = Path(read_json(lora_run / "run.json")["data_source"])
    with (lora_run / "predictions" / "test_best.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    images = [str(data / row["path"]) for row in rows]

    assert main(["predict", str(lora_run), *images, "--csv", str(tmp_path / "out.csv"), "--device", "cpu"]) == 0

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].split() == ["image", "predicted", *CLASSES]
    with (tmp_path / "out.csv").open() as handle:
        written = list(csv.reader(handle))[1:]
    assert [row[0] for row in written] == images
    for row, expected in zip(written, rows, strict=True):
        probabilities = [float(value) for value in row[2:]]
        assert probabilities == pytest.approx([float(expected[f"p_{c}"]) for c in CLASSES], abs=1e-4)
        assert row[1] == CLASSES[probabilities.index(max(probabilities))]
    predictions = predict_images(lora_run, images, device="cpu", progress=False)  # the unrounded probabilities
    for prediction, expected in zip(predictions, rows, strict=True):
        assert prediction.probabilities == pytest.approx([float(expected[f"p_{c}"]) for c in CLASSES], abs=1e-5)


def test_cli_predict_explain_of_a_baseline_run_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path, lora_run: Path
) -> None:
    image = str(image_data / "test" / CLASSES[0] / "img000.png")

    assert main(["predict", str(lora_run), image, "--explain", str(tmp_path / "maps"), "--device", "cpu"]) == 1

    assert (
        one_line_error(capsys) == "fpt: error: --explain needs fine-grained prompts (fpt, fpt+); this run trained lora"
    )
    assert not (tmp_path / "maps").exists()


def test_cli_evaluate_of_a_baseline_run_prints_its_results(capsys: pytest.CaptureFixture[str], lora_run: Path) -> None:
    assert main(["evaluate", str(lora_run), "--checkpoint", "last", "--device", "cpu", "--json"]) == 0

    assert json.loads(capsys.readouterr().out) == read_json(lora_run / "results.json")["last"]


def test_cli_preload_of_a_baseline_is_refused_before_anything_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path
) -> None:
    args = ["preload", str(image_data), "--backbone", str(tmp_path / "no-such-lpm"), "--method", "lora"]
    assert main([*args, "--cache", str(tmp_path / "cache")]) == 1
    assert "--method lora has no LPM features to preload" in one_line_error(capsys)


def test_cli_demo_backbone_takes_no_other_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["info", "--backbone", "demo", "--backbone-weights", str(tmp_path / "w.safetensors"), "--num-classes", "2"]
    assert main(args) == 1
    assert "drop --backbone-weights" in one_line_error(capsys)
