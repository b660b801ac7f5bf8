"""Training: cache and on-the-fly paths, seeding, the run directory, checkpoint selection, resume, errors."""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import fpt.data.loaders
import fpt.train
from fpt.cache import CacheWriter, FeatureCache
from fpt.config import METHOD_CONFIGS, BackboneSpec, FullFineTuningConfig, TrainingConfig
from fpt.data.datasets import Sample
from fpt.data.images import load_pixels
from fpt.data.loaders import SampleViews, collate
from fpt.data.transforms import lpm_view, side_view
from fpt.errors import FPTError
from fpt.evaluate import evaluate_run
from fpt.models.build import build_model
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import FrozenEncoder
from fpt.task import prepare
from fpt.train import cosine_schedule, resume, train
from tests.conftest import randomize_
from tests.pipeline_fixtures import (
    CLASSES,
    NUM_IMAGES,
    SPLIT_SIZES,
    assert_same_run,
    fast_training,
    interrupt_at_epoch,
    metric_lines,
    preload_into,
    read_json,
    tiny_config,
    train_until_interrupted,
    write_image_folder,
)

pytest_plugins = ("tests.pipeline_fixtures",)

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1", "precision", "recall", "kappa")


def test_run_directory_holds_config_splits_metrics_events_checkpoints_results_and_report(trained_run: Path) -> None:
    run = read_json(trained_run / "run.json")
    assert run["model"]["method"] == "fpt+"
    assert run["model"]["num_classes"] == 3
    assert run["model"]["class_names"] == list(CLASSES)
    assert run["model"]["tapped_layers"] == [2, 3]  # resolved from the preset
    assert run["training"]["epochs"] == 2
    assert run["training"]["seed"] == 0
    assert run["cache_fingerprint"] == FeatureCache.open(run["training"]["cache_dir"]).fingerprint
    assert Path(run["data_source"]).is_absolute()

    splits = read_json(trained_run / "splits.json")
    assert splits["classes"] == list(CLASSES)
    assert {name: len(rows) for name, rows in splits["splits"].items()} == {
        name: len(CLASSES) * count for name, count in SPLIT_SIZES.items()
    }

    lines = metric_lines(trained_run)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert {"train_loss", "val_loss", "lr", *(f"val_{m}" for m in METRICS)} <= line.keys()
        assert np.isfinite(line["train_loss"]) and np.isfinite(line["val_loss"])
    timings = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < line["seconds_per_step"] * 3 < line["seconds"] for line in timings)  # 3 steps an epoch

    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
    assert [event.value for event in events.Scalars("val/loss")] == pytest.approx([x["val_loss"] for x in lines])

    for name in ("best", "last"):
        files = {path.name for path in (trained_run / "checkpoints" / name).iterdir()}
        assert {"config.json", "model.safetensors"} <= files
    assert {"optimizer.safetensors", "state.json"} <= {p.name for p in (trained_run / "checkpoints" / "last").iterdir()}

    results = read_json(trained_run / "results.json")
    assert results["classes"] == list(CLASSES)
    assert results["best_epoch"] in (1, 2)
    for name in ("best", "last"):
        assert results[name]["num_samples"] == len(CLASSES) * SPLIT_SIZES["test"]
        assert {*METRICS, "loss", "confusion_matrix"} <= results[name].keys()

    report = (trained_run / "report.html").read_text()
    for png in ("curves.png", "confusion_best.png", "confusion_last.png", "roc_best.png", "roc_last.png"):
        assert f"src='{png}'" in report
        with Image.open(trained_run / png) as image:
            assert image.format == "PNG"
            assert min(image.size) > 100


def test_each_epoch_logs_gradient_norms_prompt_similarity_and_attention_entropy(trained_run: Path) -> None:
    groups = {"fusion.prompts", "fusion.out_proj", "fusion.norm", "side.blocks", "side.head", "side.patch_embed"}
    for line in metric_lines(trained_run):
        norms = {key.removeprefix("grad_norm/"): value for key, value in line.items() if key.startswith("grad_norm/")}
        assert groups <= norms.keys() and all(value > 0 for value in norms.values())
        for layer in (2, 3):  # the tapped layers
            assert -1.0 <= line[f"prompt_similarity/layer{layer}"] <= 1.0
            assert 0.0 < line[f"attention_entropy/layer{layer}"] <= 1.0
    events = EventAccumulator(str(trained_run / "tensorboard"))
    events.Reload()
    assert {"grad_norm/fusion.prompts", "attention_entropy/layer2", "prompt_similarity/layer3"} <= set(
        events.Tags()["scalars"]
    )


def test_gradient_norms_are_grouped_by_module_path() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    model[0].requires_grad_(False)
    model(torch.randn(5, 3)).square().sum().backward()
    norms = fpt.train.gradient_norms(model)
    assert set(norms) == {"1.0"}  # frozen parameters have no gradient
    expected = torch.cat([p.grad.flatten() for p in model[1].parameters()]).norm()
    torch.testing.assert_close(norms["1.0"], expected)


def test_nothing_in_a_run_directory_is_pickled(trained_run: Path) -> None:
    suffixes = {path.suffix for path in trained_run.rglob("*") if path.is_file() and path.parent.name != "tensorboard"}
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".csv", ".html", ".png", ".lock"}  # run.lock is empty
    for path in (trained_run / "checkpoints").rglob("*"):
        if path.suffix == ".safetensors":
            assert load_file(path)  # loads without unpickling anything
        elif path.is_file():
            json.loads(path.read_text())


def test_checkpoints_hold_only_the_trainable_weights_and_the_training_state(trained_run: Path) -> None:
    weights = load_file(trained_run / "checkpoints" / "last" / "model.safetensors")
    assert weights and all(key.startswith(("fusion.", "side.")) for key in weights)
    optimizer = load_file(trained_run / "checkpoints" / "last" / "optimizer.safetensors")
    assert "rng.cpu" in optimizer
    assert {key.rsplit(".", 1)[-1] for key in optimizer if key.startswith("optimizer.")} == {
        "step",
        "exp_avg",
        "exp_avg_sq",
    }
    state = read_json(trained_run / "checkpoints" / "last" / "state.json")
    assert state["epoch"] == 1  # 0-based index of the last finished epoch
    assert state["best"]["epoch"] == read_json(trained_run / "results.json")["best_epoch"]


def test_cached_and_on_the_fly_features_give_the_same_logits(
    tmp_path: Path,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    dataset, model, normalization = prepare(image_data, tiny_config(tiny_lpm_dir), fast_training(None), progress=False)
    randomize_(model.fusion, seed=1)
    randomize_(model.side, seed=2)
    model.eval()
    preload_into(model, dataset, tmp_path / "cache", normalization, batch_size=8)
    cache = FeatureCache.open(tmp_path / "cache")
    samples = dataset.splits["train"]
    to_side = side_view(model.config.side_input_size, normalization, None)
    cached = SampleViews(dataset.root, samples, side_view=to_side, cache=cache)
    on_the_fly = SampleViews(
        dataset.root, samples, side_view=to_side, lpm_view=lpm_view(model.config.lpm_input_size, normalization)
    )
    cpu = torch.device("cpu")

    with torch.no_grad():
        from_cache = model.logits(next(iter(DataLoader(cached, batch_size=12, collate_fn=collate))).to(cpu))
        from_lpm = model.logits(next(iter(DataLoader(on_the_fly, batch_size=12, collate_fn=collate))).to(cpu))

    assert from_cache.shape == (12, 3)
    assert from_lpm.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(from_cache, from_lpm, rtol=1e-2, atol=1e-2)  # float16 cache


def test_training_without_a_cache_matches_training_from_a_float32_cache(
    tmp_path: Path,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    config = tiny_config(tiny_lpm_dir)
    cached = train(
        image_data, tmp_path / "cached", config, fast_training(tmp_path / "cache", cache_dtype="float32"), False
    )
    on_the_fly = train(image_data, tmp_path / "on_the_fly", config, fast_training(None), progress=False)

    assert read_json(tmp_path / "on_the_fly" / "run.json")["cache_fingerprint"] is None
    assert read_json(tmp_path / "on_the_fly" / "run.json")["training"]["cache_dir"] is None
    for line_cached, line_on_the_fly in zip(
        metric_lines(tmp_path / "cached"), metric_lines(tmp_path / "on_the_fly"), strict=True
    ):
        assert line_on_the_fly == pytest.approx(line_cached, rel=1e-4, abs=1e-5)
    for name in ("best", "last"):
        assert getattr(on_the_fly, name)["loss"] == pytest.approx(getattr(cached, name)["loss"], rel=1e-4)
        assert getattr(on_the_fly, name)["confusion_matrix"] == getattr(cached, name)["confusion_matrix"]
    # evaluating an on-the-fly run loads the LPM again
    assert evaluate_run(tmp_path / "on_the_fly", checkpoint="last")["loss"] == pytest.approx(
        on_the_fly.last["loss"], rel=1e-6
    )


def test_the_same_seed_gives_the_same_metrics_and_another_seed_does_not(
    tmp_path: Path,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    config = tiny_config(tiny_lpm_dir)
    first = train(image_data, tmp_path / "first", config, fast_training(tmp_path / "cache"), progress=False)
    second = train(image_data, tmp_path / "second", config, fast_training(tmp_path / "cache"), progress=False)
    other = train(image_data, tmp_path / "other", config, fast_training(tmp_path / "cache", seed=1), progress=False)

    assert metric_lines(tmp_path / "first") == metric_lines(tmp_path / "second")
    assert first == second
    assert read_json(tmp_path / "first" / "results.json") == read_json(tmp_path / "second" / "results.json")
    first_weights = load_file(tmp_path / "first" / "checkpoints" / "last" / "model.safetensors")
    second_weights = load_file(tmp_path / "second" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(first_weights[key], second_weights[key]) for key in first_weights)
    losses = [line["train_loss"] for line in metric_lines(tmp_path / "other")]
    assert losses != [line["train_loss"] for line in metric_lines(tmp_path / "first")]
    assert other.last["loss"] != first.last["loss"]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_resume_after_an_interruption_gives_the_same_run_as_no_interruption(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
    use_cache: bool,
) -> None:
    config = tiny_config(tiny_lpm_dir)
    training = fast_training(tmp_path / "cache" if use_cache else None, epochs=3)
    reference = train(image_data, tmp_path / "reference", config, training, progress=False)

    train_until_interrupted(monkeypatch, image_data, tmp_path / "interrupted", config, training)
    # TensorBoard orders event files by name: timestamp in whole seconds, then host, pid and a per-process
    # counter; within one second the counter's digits (9 < 10 as text) could put the resumed file first
    time.sleep(1.0)

    resumed = resume(tmp_path / "interrupted", progress=False)

    assert resumed == reference
    assert_same_run(tmp_path / "interrupted", tmp_path / "reference")
    events = EventAccumulator(str(tmp_path / "interrupted" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]


def test_resume_restores_optimizer_scheduler_rng_and_best_score(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    training = fast_training(tmp_path / "cache", epochs=3)
    interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    monkeypatch.undo()
    saved_state = read_json(tmp_path / "run" / "checkpoints" / "last" / "state.json")
    saved_tensors = load_file(tmp_path / "run" / "checkpoints" / "last" / "optimizer.safetensors")
    seen: dict[str, Any] = {}
    train_epoch = fpt.train.Trainer.train_epoch

    def spy(trainer, loader, epoch, epochs, progress):
        optimizer = trainer.state.optimizer
        seen.update(
            epoch=epoch,
            rng=torch.get_rng_state(),
            scheduler=trainer.state.scheduler.state_dict(),
            step=optimizer.state_dict()["state"][0]["step"].item(),
            exp_avg=optimizer.state_dict()["state"][0]["exp_avg"].clone(),
        )
        return train_epoch(trainer, loader, epoch, epochs, progress)

    monkeypatch.setattr(fpt.train.Trainer, "train_epoch", spy)
    results = resume(tmp_path / "run", progress=False)

    assert seen["epoch"] == 2
    assert torch.equal(seen["rng"], saved_tensors["rng.cpu"])
    assert seen["scheduler"]["last_epoch"] == saved_state["scheduler"]["last_epoch"] == 2 * 3  # 2 epochs x 3 batches
    assert seen["step"] == saved_tensors["optimizer.0.step"].item() == 6
    assert torch.equal(seen["exp_avg"], saved_tensors["optimizer.0.exp_avg"])
    lines = metric_lines(tmp_path / "run")
    best_so_far = saved_state["best"]
    assert lines[2]["val_auc"] is not None
    expected_best = 3 if lines[2]["val_auc"] > best_so_far["score"] else best_so_far["epoch"]
    assert results.best_epoch == expected_best


def _scripted_validation_scores(
    monkeypatch: pytest.MonkeyPatch, scores: dict[str, list[float]]
) -> list[dict[str, Any]]:
    """Replace the validation metrics named in ``scores`` epoch by epoch; later calls (the test set) are real."""
    real = fpt.train.classification_metrics
    calls: list[dict[str, Any]] = []

    def scripted(labels, probabilities):
        metrics = real(labels, probabilities)
        epoch = len(calls)
        if epoch < len(next(iter(scores.values()))):
            metrics.update({name: values[epoch] for name, values in scores.items()})
        calls.append(metrics)
        return metrics

    monkeypatch.setattr(fpt.train, "classification_metrics", scripted)
    return calls


@pytest.mark.parametrize(
    ("metric", "expected_best_epoch"), [(None, 2), ("auc", 2), ("kappa", 3)], ids=["default", "auc", "kappa"]
)
def test_best_checkpoint_is_kept_by_the_selection_metric_and_both_are_tested(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
    metric: str | None,
    expected_best_epoch: int,
) -> None:
    options = {"epochs": 4} if metric is None else {"epochs": 4, "selection_metric": metric}
    training = fast_training(tmp_path / "cache", **options)
    _scripted_validation_scores(monkeypatch, {"auc": [0.6, 0.9, 0.7, 0.8], "kappa": [0.1, 0.2, 0.5, 0.3]})
    results = train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    monkeypatch.undo()

    lines = metric_lines(tmp_path / "run")
    assert [line[f"val_{metric or 'auc'}"] for line in lines] == (
        [0.1, 0.2, 0.5, 0.3] if metric == "kappa" else [0.6, 0.9, 0.7, 0.8]
    )
    assert results.best_epoch == expected_best_epoch
    # the best checkpoint holds the weights of its epoch, the last those of the last epoch
    best_on_val = evaluate_run(tmp_path / "run", split="val", checkpoint="best")
    last_on_val = evaluate_run(tmp_path / "run", split="val", checkpoint="last")
    assert best_on_val["loss"] == pytest.approx(lines[expected_best_epoch - 1]["val_loss"], rel=1e-6)
    assert last_on_val["loss"] == pytest.approx(lines[-1]["val_loss"], rel=1e-6)
    assert len({line["val_loss"] for line in lines}) == len(lines)  # epochs are distinguishable by their loss
    # both are evaluated on test at the end
    for name in ("best", "last"):
        on_test = evaluate_run(tmp_path / "run", split="test", checkpoint=name)
        assert on_test == getattr(results, name)
        assert on_test["num_samples"] == len(CLASSES) * SPLIT_SIZES["test"]
    predictions = (tmp_path / "run" / "predictions" / "test_best.csv").read_text().splitlines()
    assert predictions[0] == "path,label,p_a,p_b,p_c"
    assert len(predictions) == 1 + len(CLASSES) * SPLIT_SIZES["test"]


def test_training_into_a_directory_that_holds_a_run_is_refused_pointing_to_resume(
    trained_run: Path,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    before = (trained_run / "metrics.jsonl").read_text()

    with pytest.raises(FPTError, match=r"already holds a run; continue it with `fpt train --resume"):
        train(image_data, trained_run, tiny_config(tiny_lpm_dir), fast_training(None), progress=False)

    assert (trained_run / "metrics.jsonl").read_text() == before


def test_resume_of_a_finished_run_keeps_its_metrics_and_results(
    tmp_path: Path,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    results = train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), fast_training(tmp_path / "cache"), False)
    lines = metric_lines(tmp_path / "run")

    again = resume(tmp_path / "run", progress=False)

    assert again == results
    assert metric_lines(tmp_path / "run") == lines


def test_resume_or_evaluate_of_a_folder_without_a_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match=r"is not a training run \(no run\.json\)"):
        resume(tmp_path)
    with pytest.raises(FPTError, match=r"is not a training run \(no run\.json\)"):
        evaluate_run(tmp_path)


def test_training_preloads_only_the_missing_images_and_never_runs_the_lpm_itself(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    config = tiny_config(tiny_lpm_dir)
    dataset, model, normalization = prepare(image_data, config, fast_training(None), progress=False)
    add = CacheWriter.add

    def add_one_batch_only(self, keys, parts, digests):
        if len(self.cache) >= 8:
            raise KeyboardInterrupt
        add(self, keys, parts, digests)

    monkeypatch.setattr(CacheWriter, "add", add_one_batch_only)
    with pytest.raises(KeyboardInterrupt):
        preload_into(model, dataset, tmp_path / "cache", normalization, batch_size=8, device="auto")
    monkeypatch.undo()
    encoded: list[int] = []
    forward = FrozenEncoder.forward

    def counting_forward(self, images):
        encoded.append(images.shape[0])
        return forward(self, images)

    monkeypatch.setattr(FrozenEncoder, "forward", counting_forward)
    train(image_data, tmp_path / "first", config, fast_training(tmp_path / "cache"), progress=False)
    assert sum(encoded) == NUM_IMAGES - 8  # the preload of the missing images; training itself used the cache
    index = (tmp_path / "cache" / "index.jsonl").read_bytes()

    encoded.clear()
    train(image_data, tmp_path / "second", config, fast_training(tmp_path / "cache", seed=3), progress=False)

    assert encoded == []
    assert (tmp_path / "cache" / "index.jsonl").read_bytes() == index
    assert len(FeatureCache.open(tmp_path / "cache")) == NUM_IMAGES


def _interrupt_saving_last_checkpoint(monkeypatch: pytest.MonkeyPatch, epoch: int, mid_swap: bool) -> None:
    """Raise KeyboardInterrupt while epoch ``epoch`` (1-based) saves checkpoints/last: before it starts, or after the
    old checkpoint was moved aside but before the new one took its place."""
    save = fpt.train.save_atomically
    saves: list[str] = []

    def interrupted_save(directory: Path, write) -> None:
        if directory.name == "last":
            saves.append(directory.name)
            if len(saves) == epoch:
                if mid_swap:
                    temporary = directory.with_name("last.tmp")
                    temporary.mkdir()
                    write(temporary)
                    directory.rename(directory.with_name("last.old"))
                raise KeyboardInterrupt
        save(directory, write)

    monkeypatch.setattr(fpt.train, "save_atomically", interrupted_save)


@pytest.mark.parametrize("mid_swap", [False, True], ids=["after-metrics-line", "mid-checkpoint-swap"])
def test_resume_after_an_interruption_between_metrics_and_checkpoint_redoes_that_epoch(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
    mid_swap: bool,
) -> None:
    config, training = tiny_config(tiny_lpm_dir), fast_training(tmp_path / "cache", epochs=3)
    reference = train(image_data, tmp_path / "reference", config, training, progress=False)
    _interrupt_saving_last_checkpoint(monkeypatch, epoch=3, mid_swap=mid_swap)
    with pytest.raises(KeyboardInterrupt):
        train(image_data, tmp_path / "run", config, training, progress=False)
    monkeypatch.undo()
    assert [line["epoch"] for line in metric_lines(tmp_path / "run")] == [1, 2, 3]  # epoch 3 has no checkpoint

    resumed = resume(tmp_path / "run", progress=False)

    assert metric_lines(tmp_path / "run") == metric_lines(tmp_path / "reference")
    assert resumed == reference
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["best", "last"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]


def test_a_run_trained_with_a_relative_cache_path_can_be_evaluated_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    results = train(image_data, "run", tiny_config(tiny_lpm_dir), fast_training(Path("cache")), progress=False)
    monkeypatch.chdir(tmp_path)

    assert evaluate_run(tmp_path / "work" / "run", checkpoint="last") == results.last


def test_a_run_interrupted_in_its_first_epoch_resumes_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    config, training = tiny_config(tiny_lpm_dir), fast_training(tmp_path / "cache")
    uninterrupted = train(image_data, tmp_path / "reference", config, training, progress=False)
    interrupt_at_epoch(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        train(image_data, tmp_path / "run", config, training, progress=False)
    monkeypatch.undo()

    results = resume(tmp_path / "run", progress=False)

    assert results.best == uninterrupted.best
    assert results.last == uninterrupted.last


def test_evaluating_the_train_split_uses_plain_views(trained_run: Path) -> None:
    first = evaluate_run(trained_run, split="train", checkpoint="last", device="cpu")
    again = evaluate_run(trained_run, split="train", checkpoint="last", device="cpu")
    assert first == again  # no random crops, flips or jitter outside training


def test_a_diverging_run_stops_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    monkeypatch.setattr(FPTModel, "logits", lambda *args: torch.full((4, 3), float("nan"), requires_grad=True))
    with pytest.raises(FPTError, match="training diverged"):
        train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), fast_training(None), progress=False)


@pytest.mark.parametrize(
    "options",
    [{"lr": -1.0}, {"label_smoothing": 1.5}, {"num_workers": -1}, {"clip_grad_norm": 0.0}],
)
def test_impossible_training_settings_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(FPTError):
        fast_training(None, **options)


def test_test_predictions_survive_commas_in_paths(tmp_path: Path, tiny_lpm_dir: Path) -> None:
    data = tmp_path / "data"
    write_image_folder(data)
    for path in sorted((data / "test").rglob("*.png")):
        path.rename(path.with_name(f"patient 1, {path.name}"))
    results = train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), fast_training(None), progress=False)
    with (tmp_path / "run" / "predictions" / "test_best.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["path"].split("/")[-1].startswith("patient 1, ") for row in rows)
    assert results.best["num_samples"] == len(rows)


def test_by_default_one_optimizer_group_decays_every_trainable_parameter(tiny_lpm_dir: Path) -> None:
    model = build_model(tiny_config(tiny_lpm_dir, num_classes=3), load_lpm=False)
    groups = fpt.train.parameter_groups(model, TrainingConfig().for_method(type(model.config)))
    assert len(groups) == 1
    assert groups[0]["params"] == [p for p in model.parameters() if p.requires_grad]
    assert (groups[0]["lr"], groups[0]["weight_decay"]) == (1e-3, 0.1)


@pytest.mark.parametrize(("method", "lr"), [("fpt+", 1e-3), ("fpt", 1e-3), ("side-only", 1e-3), ("linear", 1e-2)])
def test_without_an_lr_a_run_gets_its_methods_default_and_records_it(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, method: str, lr: float
) -> None:
    config = METHOD_CONFIGS[method](backbone=BackboneSpec(str(tiny_lpm_dir)), num_classes=1, lpm_input_size=64)
    config = replace(config, side_input_size=32) if config.side_network else config
    train(image_data, tmp_path / "run", config, fast_training(tmp_path / "cache", lr=None, epochs=1), progress=False)
    assert read_json(tmp_path / "run" / "run.json")["training"]["lr"] == lr
    assert TrainingConfig(lr=5e-4).for_method(type(config)).lr == 5e-4  # a given lr is kept
    assert TrainingConfig().for_method(FullFineTuningConfig).lr == 1e-4


def test_weight_decay_scope_and_fusion_lr_scale_split_the_parameters(tiny_lpm_dir: Path) -> None:
    model = build_model(tiny_config(tiny_lpm_dir, num_classes=3), load_lpm=False)
    training = TrainingConfig(lr=1e-3, weight_decay=0.05, weight_decay_scope="weights", fusion_lr_scale=10.0)
    names = {id(p): name for name, p in model.named_parameters()}
    by_setting = {
        (group["lr"], group["weight_decay"]): {names[id(p)] for p in group["params"]}
        for group in fpt.train.parameter_groups(model, training)
    }
    assert set(by_setting) == {(1e-2, 0.05), (1e-2, 0.0), (1e-3, 0.05), (1e-3, 0.0)}
    assert {"fusion.prompts", "fusion.norm.weight", "fusion.out_proj.bias"} <= by_setting[(1e-2, 0.0)]
    assert by_setting[(1e-2, 0.05)] == {"fusion.out_proj.weight"}
    assert {"side.cls_token", "side.pos_embed", "side.head.bias"} <= by_setting[(1e-3, 0.0)]
    assert "side.head.weight" in by_setting[(1e-3, 0.05)] and "side.patch_embed.proj.weight" in by_setting[(1e-3, 0.05)]
    assert sum(len(names) for names in by_setting.values()) == sum(p.requires_grad for p in model.parameters())


def test_the_optimizer_options_reach_the_run_and_its_schedule(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    training = fast_training(None, epochs=1, fusion_lr_scale=3.0, weight_decay_scope="weights")
    train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    recorded = read_json(tmp_path / "run" / "run.json")["training"]
    assert (recorded["fusion_lr_scale"], recorded["weight_decay_scope"]) == (3.0, "weights")
    state = read_json(tmp_path / "run" / "checkpoints" / "last" / "state.json")
    assert sorted({round(group["initial_lr"], 9) for group in state["param_groups"]}) == [3e-3, 9e-3]
    with pytest.raises(FPTError, match="weight decay scope must be one of all, weights"):
        TrainingConfig(weight_decay_scope="some")
    with pytest.raises(FPTError, match="fusion learning-rate scale must be positive"):
        TrainingConfig(fusion_lr_scale=0)


def test_min_steps_raises_the_epochs_of_a_small_training_set(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    # 12 training images at batch 4: 3 steps an epoch, so 7 steps need 3 epochs where 1 was asked for
    training = fast_training(tmp_path / "cache", epochs=1, min_steps=7)
    train(image_data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)

    assert [line["epoch"] for line in metric_lines(tmp_path / "run")] == [1, 2, 3]
    assert read_json(tmp_path / "run" / "run.json")["training"]["min_steps"] == 7
    assert training.scheduled_epochs(100) == 1  # a large set keeps its epochs
    with pytest.raises(FPTError, match="min_steps must not be negative"):
        fast_training(None, min_steps=-1)


def test_the_default_schedule_is_the_methods_and_an_epoch_count_asked_for_is_kept() -> None:
    def schedule(training: TrainingConfig, method: str) -> tuple[int | None, int | None]:
        resolved = training.for_method(METHOD_CONFIGS[method])
        return resolved.epochs, resolved.min_steps

    for method in ("fpt+", "fpt", "side-only", "linear"):
        assert schedule(TrainingConfig(), method) == (20, 500)
    for method in ("full", "lora", "vpt-deep", "adapter"):  # every step of these runs the LPM
        assert schedule(TrainingConfig(), method) == (20, 0)
    assert schedule(TrainingConfig(epochs=3), "fpt+") == (3, 0)  # an epoch count asked for is kept
    assert schedule(TrainingConfig(min_steps=7), "full") == (20, 7)
    assert schedule(TrainingConfig(epochs=3, min_steps=7), "fpt+") == (3, 7)
    assert TrainingConfig().for_method(METHOD_CONFIGS["fpt+"]).scheduled_epochs(10) == 50  # 200 images, batch 16
    assert TrainingConfig().for_method(METHOD_CONFIGS["fpt+"]).scheduled_epochs(100) == 20
    with pytest.raises(FPTError, match="resolved for a method"):
        TrainingConfig().scheduled_epochs(10)


def test_grad_checkpointing_gives_the_same_run_and_only_methods_with_a_side_network_take_it(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    config = tiny_config(tiny_lpm_dir)
    plain = fast_training(tmp_path / "cache", epochs=2)
    train(image_data, tmp_path / "plain", config, plain, progress=False)
    train(image_data, tmp_path / "recomputed", config, replace(plain, grad_checkpointing=True), progress=False)
    assert read_json(tmp_path / "recomputed" / "run.json")["training"]["grad_checkpointing"] is True
    assert_same_run(tmp_path / "recomputed", tmp_path / "plain")
    for method in ("linear", "full", "lora"):
        with pytest.raises(FPTError, match=f"{method} has no side network to recompute: drop --grad-checkpointing"):
            TrainingConfig(grad_checkpointing=True).for_method(METHOD_CONFIGS[method])


def test_images_decoded_once_into_memory_give_the_same_run_as_decoding_every_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    decoded_files: list[str] = []
    load = fpt.data.loaders.load_pixels

    def counted(path: Path) -> object:
        decoded_files.append(str(path))
        return load(path)

    monkeypatch.setattr(fpt.data.loaders, "load_pixels", counted)
    config = tiny_config(tiny_lpm_dir)
    every_epoch = fast_training(tmp_path / "cache", epochs=3, num_workers=0, decoded_images_mib=0)
    train(image_data, tmp_path / "every_epoch", config, every_epoch, progress=False)
    assert len(decoded_files) > 3 * NUM_IMAGES // 2  # the training images, once per epoch, and more
    decoded_files.clear()
    train(image_data, tmp_path / "in_memory", config, replace(every_epoch, decoded_images_mib=64), progress=False)
    assert decoded_files == []  # every view came from the pixels decoded once
    assert_same_run(tmp_path / "in_memory", tmp_path / "every_epoch")

    # the same with a DataLoader worker process, which reads the pixels from shared memory
    in_worker = replace(every_epoch, num_workers=1)
    train(image_data, tmp_path / "every_epoch_w", config, in_worker, progress=False)
    train(image_data, tmp_path / "in_memory_w", config, replace(in_worker, decoded_images_mib=64), progress=False)
    assert_same_run(tmp_path / "in_memory_w", tmp_path / "every_epoch_w")


def test_decode_in_memory_holds_8_bit_images_within_its_budget_only(tmp_path: Path, image_data: Path) -> None:
    samples = [Sample(path.relative_to(image_data).as_posix(), 0) for path in sorted(image_data.rglob("*.png"))]
    decoded = fpt.data.loaders.decode_in_memory(image_data, samples, budget_bytes=2**20)
    assert decoded is not None and sorted(decoded) == sorted(s.path for s in samples)
    first = samples[0].path
    assert torch.equal(decoded[first].permute(2, 0, 1), load_pixels(image_data / first))
    pixels = 48 * 56 * 3 * len(samples)
    assert fpt.data.loaders.decode_in_memory(image_data, samples, budget_bytes=pixels - 1) is None
    assert fpt.data.loaders.decode_in_memory(image_data, samples, budget_bytes=pixels) is not None
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(tmp_path / "wide.png")
    assert fpt.data.loaders.decode_in_memory(tmp_path, [Sample("wide.png", 0)], budget_bytes=2**20) is None


def test_cosine_schedule_holds_the_peak_until_its_decay_fraction_and_is_the_plain_cosine_at_one() -> None:
    plain = cosine_schedule(100, 10)  # the official schedule: the decay starts right after the warm-up
    expected = [0.5 * (1 + math.cos(math.pi * (step - 10) / 90)) for step in range(10, 100)]
    assert [plain(step) for step in range(10, 100)] == pytest.approx(expected, abs=1e-12)

    held = cosine_schedule(100, 10, 0.3)  # 90 steps after the warm-up: 63 at the peak, then 27 of decay
    assert [held(step) for step in range(10)] == [(step + 1) / 10 for step in range(10)]
    assert all(held(step) == 1.0 for step in range(10, 74))
    decay = [held(step) for step in range(73, 100)]
    assert all(a > b for a, b in itertools.pairwise(decay)) and decay[-1] > 0.0
    assert held(100) == 0.0
