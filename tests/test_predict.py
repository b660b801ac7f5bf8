"""Evaluation and prediction with a trained run, and the prompt-attention maps behind `--explain`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from fpt.errors import FPTError
from fpt.evaluate import evaluate_run
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import LPMFeatures
from fpt.predict import predict_images, prompt_attention_map
from tests.conftest import randomize_
from tests.pipeline_fixtures import (
    CLASSES,
    LPM_INPUT_SIZE,
    SPLIT_SIZES,
    read_json,
    tiny_config,
)

pytest_plugins = ("tests.pipeline_fixtures",)


def test_evaluate_run_reproduces_the_test_results_of_both_checkpoints(trained_run: Path) -> None:
    results = read_json(trained_run / "results.json")

    for name in ("best", "last"):
        metrics = evaluate_run(trained_run, split="test", checkpoint=name, device="cpu")
        assert metrics == results[name]


def test_evaluate_run_on_another_split_counts_its_images(trained_run: Path) -> None:
    metrics = evaluate_run(trained_run, split="train", checkpoint="last", device="cpu")

    assert metrics["num_samples"] == len(CLASSES) * SPLIT_SIZES["train"]
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_samples"]
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_evaluate_run_refuses_an_unknown_split(trained_run: Path) -> None:
    with pytest.raises(FPTError, match="unknown split 'holdout'; the run has train, val, test"):
        evaluate_run(trained_run, split="holdout")


def _test_images(run_dir: Path) -> tuple[list[Path], list[list[float]]]:
    """The test images of a run and the probabilities its best checkpoint gave them during training."""
    data = Path(read_json(run_dir / "run.json")["data_source"])
    with (run_dir / "predictions" / "test_best.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return [data / row["path"] for row in rows], [[float(row[f"p_{c}"]) for c in CLASSES] for row in rows]


def test_predicted_probabilities_sum_to_one_and_match_the_runs_test_predictions(trained_run: Path) -> None:
    images, expected = _test_images(trained_run)

    predictions = predict_images(trained_run, images, device="cpu", batch_size=4, progress=False)

    assert [prediction.path for prediction in predictions] == [str(image) for image in images]
    for prediction, probabilities in zip(predictions, expected, strict=True):
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-6)
        assert min(prediction.probabilities) >= 0.0
        # the LPM runs on the fly here; training evaluated from the float16 cache
        assert prediction.probabilities == pytest.approx(probabilities, abs=2e-3)
        assert prediction.predicted == CLASSES[max(range(len(CLASSES)), key=prediction.probabilities.__getitem__)]


def test_predictions_do_not_depend_on_the_batch_size(trained_run: Path) -> None:
    images, _ = _test_images(trained_run)

    one_by_one = predict_images(trained_run, images, device="cpu", batch_size=1, progress=False)
    together = predict_images(trained_run, images, device="cpu", batch_size=len(images), progress=False)

    for single, batched in zip(one_by_one, together, strict=True):
        assert single.probabilities == pytest.approx(batched.probabilities, abs=1e-5)


def test_explain_writes_one_overlay_per_image_with_distinct_names(tmp_path: Path, trained_run: Path) -> None:
    images, _ = _test_images(trained_run)
    images = images[:3]  # test/a/img000.png, test/a/img001.png, test/b/img000.png: a repeated file name

    predict_images(trained_run, images, device="cpu", explain_dir=tmp_path / "explain", progress=False)

    written = sorted(path.name for path in (tmp_path / "explain").iterdir())
    assert [image.name for image in images] == ["img000.png", "img001.png", "img000.png"]
    assert written == ["img000_2_attention.png", "img000_attention.png", "img001_attention.png"]
    for name in written:
        with Image.open(tmp_path / "explain" / name) as overlay:
            assert overlay.format == "PNG"
            assert overlay.mode == "RGB"
            assert overlay.size == (LPM_INPUT_SIZE, LPM_INPUT_SIZE)


def test_prediction_of_a_missing_image_is_an_error_naming_it(tmp_path: Path, trained_run: Path) -> None:
    with pytest.raises(FPTError, match=r"image not found: .*nowhere\.png"):
        predict_images(trained_run, [tmp_path / "nowhere.png"], device="cpu", progress=False)


def _model(lpm_dir: Path) -> FPTModel:
    model = FPTModel.from_config(tiny_config(lpm_dir, num_classes=3))
    randomize_(model.fusion, seed=3)
    return model.eval()


def test_prompt_attention_map_puts_all_mass_on_the_one_patch_every_kept_token_points_to(
    tiny_lpm_dir: Path,
) -> None:
    model = _model(tiny_lpm_dir)
    batch, layers, heads, kept, head_dim = 2, 2, 4, 5, 16
    keys = torch.randn(batch, layers, heads, kept, head_dim)
    # token 0 is the CLS token (left out); token 1 + 6 is patch (1, 2) of the 4 x 4 grid; for the second
    # image the non-CLS tokens point at patch (3, 0) = token 1 + 12
    indices = torch.zeros(batch, layers, heads, kept, dtype=torch.long)
    indices[0, ..., 1:] = 1 + 6
    indices[1, ..., 1:] = 1 + 12
    features = LPMFeatures(keys, torch.randn_like(keys), indices)

    with torch.no_grad():
        maps = prompt_attention_map(model, features, LPM_INPUT_SIZE)

    assert maps.shape == (batch, 4, 4)
    expected = torch.zeros(batch, 4, 4)
    expected[0, 1, 2] = 1.0
    expected[1, 3, 0] = 1.0
    torch.testing.assert_close(maps, expected)


def test_prompt_attention_map_is_the_fusion_attention_scattered_to_token_positions(
    tiny_lpm_dir: Path,
) -> None:
    model = _model(tiny_lpm_dir)
    images = torch.randn(3, 3, LPM_INPUT_SIZE, LPM_INPUT_SIZE)

    with torch.no_grad():
        features = model.encode(images)
        maps = prompt_attention_map(model, features, LPM_INPUT_SIZE)
        queries = model.fusion.queries()  # [L, M, d]

    batch, layers, heads, kept, head_dim = features.keys.shape
    grid = LPM_INPUT_SIZE // 16
    expected = torch.zeros(batch, grid * grid, dtype=torch.float64)
    for b in range(batch):
        for layer in range(layers):
            for head in range(heads):
                q = queries[layer, :, head * head_dim : (head + 1) * head_dim].double()  # [M, d_head]
                k = features.keys[b, layer, head].double()  # [T, d_head]
                weights = torch.softmax(q @ k.T / head_dim**0.5, dim=-1)  # [M, T]
                for slot in range(kept):
                    token = int(features.token_indices[b, layer, head, slot])
                    if token >= 1:  # CLS left out
                        expected[b, token - 1] += weights[:, slot].sum()
    expected = expected / expected.amax(dim=1, keepdim=True)

    assert maps.shape == (batch, grid, grid)
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(batch))
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.double().flatten(1), expected, rtol=1e-5, atol=1e-6)
    # patches no kept token points to get nothing
    patches_kept = {int(t) - 1 for t in features.token_indices[0].flatten() if t >= 1}
    for patch in set(range(grid * grid)) - patches_kept:
        assert maps[0].flatten()[patch] == 0


def test_overlay_names_stay_unique_even_against_numbered_names() -> None:
    from fpt.predict import _unique_names

    names = ["a_attention.png", "a_attention.png", "a_2_attention.png", "a_attention.png"]
    assert len(set(_unique_names(names))) == 4
