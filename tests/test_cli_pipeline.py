"""The pipeline commands: `fpt preload`, `fpt train` (and --resume), `fpt evaluate`, `fpt predict`, and their errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import fpt.run
from fpt.cache import FeatureCache
from fpt.cli import main
from fpt.render import TABLE_METRICS
from tests.pipeline_fixtures import (
    CLASSES,
    NUM_IMAGES,
    SPLIT_SIZES,
    cli_model_args,
    cli_run_args,
    interrupt_at_epoch,
    metric_lines,
    one_line_error,
    read_json,
)

pytest_plugins = ("tests.pipeline_fixtures",)


def test_preload_reports_what_it_computed_and_reuses_everything_on_a_rerun(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    args = ["preload", str(image_data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]

    assert main([*args, "--cache-dtype", "float32"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--cache-dtype", "float32"]) == 0
    second = capsys.readouterr().out

    assert f"cache {tmp_path / 'cache'}: {NUM_IMAGES} images computed, 0 already cached" in first
    assert f"0 images computed, {NUM_IMAGES} already cached" in second
    size = sum(path.stat().st_size for path in (tmp_path / "cache").iterdir())
    assert f"{size / 2**20:.1f} MiB on disk" in second
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.layout.dtype == "float32"
    assert len(cache) == NUM_IMAGES


def test_preload_refuses_a_cache_of_other_settings_and_overwrite_rebuilds_it(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    args = ["preload", str(image_data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]
    assert main(args) == 0
    capsys.readouterr()

    assert main([*args, "--cache-dtype", "bfloat16"]) == 1
    error = one_line_error(capsys)
    assert "dtype: cache has 'float16', this run needs 'bfloat16'" in error
    assert f"--cache {tmp_path / 'cache'} --overwrite" in error

    assert main([*args, "--cache-dtype", "bfloat16", "--overwrite"]) == 0
    assert f"{NUM_IMAGES} images computed, 0 already cached" in capsys.readouterr().out
    assert FeatureCache.open(tmp_path / "cache").layout.dtype == "bfloat16"


def test_evaluate_prints_the_metrics_table_of_a_checkpoint_on_a_split(
    capsys: pytest.CaptureFixture[str],
    trained_run: Path,
) -> None:
    results = read_json(trained_run / "results.json")

    assert main(["evaluate", str(trained_run), "--device", "cpu"]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["metric", "best", "(test)"]
    assert [line.split()[0] for line in lines[1:]] == list(TABLE_METRICS)
    for line in lines[1:]:
        name, value = line.split()
        assert value == ("n/a" if results["best"][name] is None else f"{results['best'][name]:.4f}")


def test_evaluate_json_holds_the_metrics_of_the_chosen_split_and_checkpoint(
    capsys: pytest.CaptureFixture[str],
    trained_run: Path,
) -> None:
    args = ["evaluate", str(trained_run), "--split", "test", "--checkpoint", "last", "--device", "cpu", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == read_json(trained_run / "results.json")["last"]

    assert main(["evaluate", str(trained_run), "--split", "val", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == len(CLASSES) * SPLIT_SIZES["val"]


def test_predict_prints_class_probabilities_per_image_and_writes_a_csv(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    trained_run: Path,
) -> None:
    images = [str(image_data / "test" / name / "img000.png") for name in CLASSES]

    assert main(["predict", str(trained_run), *images, "--csv", str(tmp_path / "out.csv"), "--device", "cpu"]) == 0

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].split() == ["image", "predicted", *CLASSES]
    assert [line.split()[0] for line in printed[1:]] == images
    with (tmp_path / "out.csv").open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["image", "predicted", *CLASSES]
    assert [row[0] for row in rows[1:]] == images
    for row, line in zip(rows[1:], printed[1:], strict=True):
        probabilities = [float(value) for value in row[2:]]
        assert sum(probabilities) == pytest.approx(1.0, abs=2e-4)  # printed with 4 decimals
        assert row[1] == CLASSES[probabilities.index(max(probabilities))]
        assert line.split() == row


def test_predict_explain_writes_one_png_per_image(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    trained_run: Path,
) -> None:
    images = [str(image_data / "val" / name / "img001.png") for name in CLASSES]

    assert main(["predict", str(trained_run), *images, "--explain", str(tmp_path / "maps"), "--device", "cpu"]) == 0

    assert f"prompt-attention overlays written to {tmp_path / 'maps'}" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == [
        "img001_2_attention.png",
        "img001_3_attention.png",
        "img001_attention.png",
    ]


def _missing_data(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["preload", str(tmp_path / "no-such-folder"), "--backbone", str(lpm_dir), "--cache", str(tmp_path / "c")]


def _train_without_run(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["train", str(tmp_path), "--backbone", str(lpm_dir)]


def _train_into_existing_run(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["train", str(tmp_path), "--run", str(run_dir), "--backbone", str(lpm_dir)]


def _evaluate_non_run(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["evaluate", str(tmp_path)]


def _resume_non_run(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["train", "--resume", str(tmp_path)]


def _predict_missing_image(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["predict", str(run_dir), str(tmp_path / "missing.png"), "--device", "cpu"]


def _unknown_device(tmp_path: Path, lpm_dir: Path, run_dir: Path) -> list[str]:
    return ["evaluate", str(run_dir), "--device", "tpu"]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (_missing_data, "is neither a folder nor a .csv manifest"),
        (_train_without_run, "give DATA and --run DIR (or --resume RUN to continue a run)"),
        (_train_into_existing_run, "already holds a run; continue it with `fpt train --resume"),
        (_evaluate_non_run, "is not a training run (no run.json)"),
        (_resume_non_run, "is not a training run (no run.json)"),
        (_predict_missing_image, "image not found:"),
        (_unknown_device, "unknown device 'tpu'"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_user_errors_are_one_line_with_exit_code_1(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_lpm_dir: Path,
    trained_run: Path,
    command,
    expected: str,
) -> None:
    assert main(command(tmp_path, tiny_lpm_dir, trained_run)) == 1
    assert expected in one_line_error(capsys)


@pytest.mark.slow
def test_end_to_end_preload_train_evaluate_predict_and_resume(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    cache, run, interrupted = tmp_path / "cache", tmp_path / "run", tmp_path / "interrupted"
    options = [*cli_model_args(tiny_lpm_dir), *cli_run_args(cache)]
    training = ["--epochs", "2", "--lr", "3e-3", "--metric", "kappa"]

    # preload, then train from the complete cache
    assert main(["preload", str(image_data), *options]) == 0
    assert f"{NUM_IMAGES} images computed" in capsys.readouterr().out
    index = (cache / "index.jsonl").read_bytes()
    assert main(["train", str(image_data), "--run", str(run), *options, *training]) == 0
    out = capsys.readouterr().out
    assert f"run written to {run} (report: {run / 'report.html'})" in out
    assert (cache / "index.jsonl").read_bytes() == index  # nothing recomputed
    results = read_json(run / "results.json")
    assert read_json(run / "run.json")["training"]["selection_metric"] == "kappa"
    assert [line["epoch"] for line in metric_lines(run)] == [1, 2]
    assert (run / "report.html").is_file()

    # evaluate
    assert main(["evaluate", str(run), "--checkpoint", "last", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == results["last"]

    # predict with overlays
    images = [str(path) for path in sorted((image_data / "test").rglob("*.png"))]
    explain = tmp_path / "explain"
    assert main(["predict", str(run), *images, "--csv", str(tmp_path / "p.csv"), "--explain", str(explain)]) == 0
    capsys.readouterr()
    with (tmp_path / "p.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 1 + len(images)
    assert len(list(explain.glob("*.png"))) == len(images)

    # the same training interrupted in its second epoch, then resumed: the same run
    interrupt_at_epoch(monkeypatch, 1)
    assert main(["train", str(image_data), "--run", str(interrupted), *options, *training]) == 130
    assert "interrupted; everything finished so far is kept" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", str(interrupted)]) == 0
    capsys.readouterr()
    assert metric_lines(interrupted) == metric_lines(run)
    assert read_json(interrupted / "results.json") == results

    # resuming a finished run keeps its results
    assert main(["train", "--resume", str(run)]) == 0
    assert read_json(run / "results.json") == results
    assert [line["epoch"] for line in metric_lines(run)] == [1, 2]


def test_errors_inside_dataloader_workers_are_still_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    trained_run: Path,
) -> None:
    # a copy of the run, loading data in a worker process, whose cache copy has a corrupt test record
    run, cache_dir = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(trained_run, run)
    record = read_json(run / "run.json")
    shutil.copytree(record["training"]["cache_dir"], cache_dir)
    record["training"]["num_workers"] = 1
    record["training"]["batch_size"] = 1  # a loader of one batch would load it in the process itself
    record["training"]["cache_dir"] = str(cache_dir)
    (run / "run.json").write_text(json.dumps(record))
    entry = FeatureCache.open(cache_dir).entries["test/b/img001.png"]
    with (cache_dir / entry.shard).open("r+b") as shard:
        shard.seek(entry.slot * FeatureCache.open(cache_dir).layout.nbytes)
        shard.write(b"\xff" * 8)
    workers: list[int] = []
    worker_count = fpt.run.worker_count

    def recorded_worker_count(requested: int | None, batches: int | None = None) -> int:
        workers.append(worker_count(requested, batches))
        return workers[-1]

    monkeypatch.setattr(fpt.run, "worker_count", recorded_worker_count)

    assert main(["evaluate", str(run), "--device", "cpu"]) == 1

    assert workers == [1]  # the record was read, and refused, in a worker process

    error = one_line_error(capsys)
    assert error.startswith("fpt: error: the cached features of 'test/b/img001.png'")
    assert "fpt cache verify" in error
    assert "worker" not in error


def test_resume_refuses_options_it_would_ignore_but_takes_another_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained_run: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--epochs", "9"]) == 1
    assert "only --device and --workers may change (drop --epochs)" in one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--device", "cpu", "--workers", "0"]) == 0


def test_relative_backbone_paths_are_recorded_absolute(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_lpm_dir: Path,
    image_data: Path,
) -> None:
    shutil.copytree(tiny_lpm_dir, tmp_path / "lpm")
    monkeypatch.chdir(tmp_path)
    args = ["train", str(image_data), "--run", "run", *cli_model_args(Path("lpm")), *cli_run_args(Path("cache"))]
    assert main(args) == 0
    monkeypatch.chdir("/")
    assert read_json(tmp_path / "run" / "run.json")["model"]["backbone"]["name"] == str(tmp_path / "lpm")
    assert main(["predict", str(tmp_path / "run"), *map(str, sorted(image_data.rglob("*.png"))[:1])]) == 0
