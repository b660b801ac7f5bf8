"""`fpt bench accuracy`: the efficiency scores by hand, and the benchmark end to end on the tiny data: its files,
each row against its run and the memory harness, reuse of finished runs, resume of interrupted ones, the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

import fpt.bench.accuracy_benchmark as accuracy_benchmark
import fpt.preload
from fpt.bench.accuracy_benchmark import (
    AccuracyBenchmark,
    AccuracyRow,
    AccuracySetting,
    benchmark_accuracy,
    efficiency_score,
    format_accuracy_table,
)
from fpt.bench.memory_benchmark import MemorySetting, MiB, full_fine_tuning_params
from fpt.bench.steps import training_step
from fpt.cli import main
from fpt.config import LinearProbeConfig, TrainingConfig
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from fpt.preload import PreloadSummary
from tests.pipeline_fixtures import LPM_INPUT_SIZE, NUM_IMAGES, fast_training, interrupt_at_epoch, read_json

pytest_plugins = ("tests.pipeline_fixtures",)

METHODS = ("linear", "fpt", "fpt+", "fpt+/no-cache")  # fpt and fpt+ tap different layers: a cache each
RUN_DIRS = {"linear": "linear", "fpt": "fpt", "fpt+": "fpt+", "fpt+/no-cache": "fpt+-no-cache"}
BATCH_SIZE = 4


def test_efficiency_score_by_hand() -> None:
    assert efficiency_score(0.9, 1.0) == pytest.approx(0.9 * math.exp(-math.log10(2)))
    assert efficiency_score(0.9, 1.0) == pytest.approx(0.66605, abs=1e-5)  # exp(-0.30103) = 0.74006
    assert efficiency_score(0.8, 9.0) == pytest.approx(0.8 * math.exp(-1.0))  # log10(10) = 1
    assert efficiency_score(0.75, 0.0) == 0.75
    assert efficiency_score(1.0, 0.01) < 1.0  # any cost lowers the score
    assert efficiency_score(0.9, 0.01) > efficiency_score(0.9, 0.02)


def benchmark_training(cache_dir: Path | None, **overrides: Any) -> TrainingConfig:
    """One quick epoch on the CPU, batch 4, no DataLoader workers."""
    return fast_training(cache_dir, **{"epochs": 1, "batch_size": BATCH_SIZE, **overrides})


@pytest.fixture(scope="module")
def bench(
    tmp_path_factory: pytest.TempPathFactory, image_data: Path, tiny_lpm_dir: Path
) -> tuple[Path, AccuracyBenchmark]:
    """``benchmark_accuracy`` of METHODS on the tiny data (read only): its output folder and its result."""
    root = tmp_path_factory.mktemp("bench_accuracy")
    backbone = BackboneSpec(str(tiny_lpm_dir))
    result = benchmark_accuracy(
        image_data, root / "out", METHODS, backbone, LPM_INPUT_SIZE, benchmark_training(root / "cache"), progress=False
    )
    return root / "out", result


def test_benchmark_writes_accuracy_json_and_markdown(bench: tuple[Path, AccuracyBenchmark], image_data: Path) -> None:
    out, result = bench

    assert read_json(out / "accuracy.json") == json.loads(json.dumps(result.to_dict()))
    assert (out / "accuracy.md").read_text() == format_accuracy_table(result) + "\n"
    assert list(result.methods) == list(METHODS)
    assert sorted(path.name for path in (out / "runs").iterdir()) == sorted(RUN_DIRS.values())
    setting = result.setting
    assert setting.data == str(image_data.resolve())
    assert setting.lpm_input_size == LPM_INPUT_SIZE
    assert setting.training.epochs == 1 and setting.training.batch_size == BATCH_SIZE


@pytest.mark.parametrize("method", METHODS)
def test_each_row_holds_its_runs_best_test_metrics(bench: tuple[Path, AccuracyBenchmark], method: str) -> None:
    out, result = bench
    run_dir = out / "runs" / RUN_DIRS[method]
    results = read_json(run_dir / "results.json")
    row = result.methods[method]

    assert read_json(run_dir / "run.json")["model"]["method"] == method.removesuffix("/no-cache")
    for metric in ("auc", "accuracy", "kappa"):
        assert getattr(row, metric) == results["best"][metric]
    assert row.best_epoch == results["best_epoch"] == 1
    seconds = [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row.train_seconds == sum(seconds) > 0


def test_no_cache_variant_trains_without_the_feature_cache(bench: tuple[Path, AccuracyBenchmark]) -> None:
    out, result = bench
    cached = read_json(out / "runs" / "fpt+" / "run.json")
    uncached = read_json(out / "runs" / "fpt+-no-cache" / "run.json")

    assert cached["training"]["cache_dir"] == str((out.parent / "cache" / "fpt+").resolve())
    assert read_json(out / "runs" / "fpt" / "run.json")["training"]["cache_dir"] == str(out.parent / "cache" / "fpt")
    assert cached["cache_fingerprint"] is not None
    assert uncached["training"]["cache_dir"] is None and uncached["cache_fingerprint"] is None
    assert (out.parent / "cache").is_dir()
    rows = result.methods
    assert rows["fpt+/no-cache"].learnable_params == rows["fpt+"].learnable_params
    assert rows["fpt+/no-cache"].peak_bytes > rows["fpt+"].peak_bytes  # it runs the LPM in every step


def test_full_fine_tuning_is_metered_for_the_ratios_though_not_trained(
    bench: tuple[Path, AccuracyBenchmark], tiny_lpm_dir: Path
) -> None:
    out, result = bench
    memory = result.setting.memory
    backbone = BackboneSpec(str(tiny_lpm_dir))

    assert "full" not in result.methods and not (out / "runs" / "full").exists()
    assert (memory.input_size, memory.batch_size, memory.num_classes, memory.device) == (64, 4, 3, "cpu")
    full_params = full_fine_tuning_params(backbone, 3, LPM_INPUT_SIZE)
    assert memory.full_fine_tuning_params == full_params
    full_peak = result.setting.full_fine_tuning_peak_bytes
    assert isinstance(full_peak, int) and full_peak > 0
    for method, row in result.methods.items():
        learnable = training_step(method, backbone, LPM_INPUT_SIZE, BATCH_SIZE, num_classes=3).learnable_params
        assert row.learnable_params == learnable
        assert row.param_ratio == learnable / full_params
        assert row.peak_meter == "measured"  # full was measured too: both peaks on the same meter
        assert row.memory_ratio == row.peak_bytes / full_peak
        assert 0 < row.memory_ratio < 1


@pytest.mark.parametrize("method", METHODS)
def test_ppe_and_pme_are_the_efficiency_scores_of_the_auc(bench: tuple[Path, AccuracyBenchmark], method: str) -> None:
    row = bench[1].methods[method]
    assert row.auc is not None
    assert row.ppe == efficiency_score(row.auc, row.param_ratio)
    assert row.pme == efficiency_score(row.auc, row.memory_ratio)
    assert row.pme < row.ppe <= row.auc  # a few percent of the parameters, a larger share of the memory


def test_markdown_row_shows_the_numbers_of_the_result(bench: tuple[Path, AccuracyBenchmark]) -> None:
    out, result = bench
    row = result.methods["linear"]
    lines = (out / "accuracy.md").read_text().splitlines()

    assert lines[2].startswith("| method | test AUC | accuracy | kappa | learnable | r | peak memory | m | PPE | PME |")
    assert lines[4] == (
        f"| linear | {row.auc:.3f} | {row.accuracy:.3f} | {row.kappa:.3f} | 387 | "
        f"{100 * row.param_ratio:.2f} % | {row.peak_bytes / MiB:,.1f} MiB (measured) | "
        f"{100 * row.memory_ratio:.2f} % | {row.ppe:.3f} | {row.pme:.3f} | {row.train_seconds:.0f} s |"
    )
    assert [line.split(" | ")[0] for line in lines[4:]] == [f"| {m}" for m in METHODS]


def test_format_accuracy_table_by_hand() -> None:
    row = AccuracyRow(
        auc=None,
        accuracy=0.5,
        kappa=0.25,
        best_epoch=None,
        learnable_params=1234567,
        param_ratio=0.0123,
        peak_bytes=3 * MiB,
        peak_meter="simulated",
        memory_ratio=None,
        ppe=None,
        pme=None,
        train_seconds=61.6,
        lr=0.0001,
        val_score=None,
    )
    memory = MemorySetting(BackboneSpec("vit"), 512, 16, 2, "float16", "cpu", "m", "2", 1)
    training = TrainingConfig(epochs=20, lr=0.0001, batch_size=16, seed=0)
    setting = AccuracySetting("/data", BackboneSpec("vit"), 512, training, memory, None)

    lines = format_accuracy_table(AccuracyBenchmark(setting, {"lora": row})).splitlines()

    header = "vit at 512 px on /data; 20 epochs, lr 0.0001, batch 16, seed 0; memory: one float32 step on cpu (m)"
    assert lines[0] == header + ", torch 2"
    assert (
        lines[4] == "| lora | n/a | 0.500 | 0.250 | 1,234,567 | 1.23 % | 3.0 MiB (simulated) | n/a | n/a | n/a | 62 s |"
    )


def test_second_call_reuses_the_finished_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bench: tuple[Path, AccuracyBenchmark],
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    out, first = bench
    shutil.copytree(out, tmp_path / "out")
    (tmp_path / "out" / "accuracy.json").unlink()

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(accuracy_benchmark, "train", must_not_run)
    monkeypatch.setattr(accuracy_benchmark, "resume", must_not_run)
    # another cache folder: nothing is preloaded either; gradient checkpointing gives the same runs (and the probe,
    # which has no side network, is trained without it)
    training = benchmark_training(tmp_path / "unused-cache", grad_checkpointing=True)
    again = benchmark_accuracy(
        image_data, tmp_path / "out", METHODS, BackboneSpec(str(tiny_lpm_dir)), LPM_INPUT_SIZE, training, progress=False
    )

    assert again.methods == first.methods  # the metrics of the runs and the same (exact) peaks
    assert (tmp_path / "out" / "accuracy.json").is_file()
    assert not (tmp_path / "unused-cache").exists()


def test_interrupted_run_is_resumed_and_matches_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    backbone = BackboneSpec(str(tiny_lpm_dir))
    training = benchmark_training(None, epochs=2)
    reference = benchmark_accuracy(image_data, tmp_path / "reference", ["linear"], backbone, 64, training, False)

    interrupt_at_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        benchmark_accuracy(image_data, tmp_path / "out", ["linear"], backbone, 64, training, progress=False)
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "runs" / "linear"
    assert (run_dir / "run.json").is_file() and not (run_dir / "results.json").exists()
    assert not (tmp_path / "out" / "accuracy.json").exists()

    resumed: list[Path] = []
    real_resume = accuracy_benchmark.resume

    def observed_resume(directory: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        resumed.append(directory)
        return real_resume(directory, *args, **kwargs)

    def must_not_train(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an interrupted run was started again instead of resumed")

    monkeypatch.setattr(accuracy_benchmark, "resume", observed_resume)
    monkeypatch.setattr(accuracy_benchmark, "train", must_not_train)
    result = benchmark_accuracy(image_data, tmp_path / "out", ["linear"], backbone, 64, training, progress=False)

    assert resumed == [run_dir]
    row, expected = result.methods["linear"], reference.methods["linear"]
    for name in ("auc", "accuracy", "kappa", "best_epoch", "learnable_params"):
        assert getattr(row, name) == getattr(expected, name)
    assert read_json(run_dir / "results.json")["best"]["auc"] == row.auc
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_side_only_beside_cached_methods_trains_without_a_cache(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    """side-only reads no LPM features: the shared LPM pass fills the others' caches and leaves it out."""
    training = benchmark_training(tmp_path / "cache")
    backbone = BackboneSpec(str(tiny_lpm_dir))
    methods = ["linear", "side-only", "fpt+"]
    result = benchmark_accuracy(image_data, tmp_path / "out", methods, backbone, 64, training, progress=False)

    assert list(result.methods) == methods
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["fpt+", "linear"]
    assert read_json(tmp_path / "out" / "runs" / "side-only" / "run.json")["training"]["cache_dir"] is None


def test_unknown_method_is_refused_before_anything_is_trained(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    with pytest.raises(FPTError, match="unknown method\\(s\\) nope; choose from full"):
        benchmark_accuracy(
            image_data,
            tmp_path / "out",
            ["linear", "nope"],
            BackboneSpec(str(tiny_lpm_dir)),
            64,
            benchmark_training(None),
        )
    assert not (tmp_path / "out").exists()


def test_cli_trains_meters_and_prints_the_table(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # any default folder lands in the test's own
    out = tmp_path / "out"
    args = ["bench", "accuracy", str(image_data), "--backbone", str(tiny_lpm_dir), "--input-size", "64"]
    args += ["--methods", "linear", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]

    assert main([*args, "--out", str(out)]) == 0

    printed = capsys.readouterr().out.splitlines()
    result = read_json(out / "accuracy.json")
    assert printed[0] == f"[1/1] linear -> {out / 'runs' / 'linear'}"
    table = (out / "accuracy.md").read_text().splitlines()
    assert printed[-len(table) - 1 : -1] == table
    assert printed[-1] == f"wrote {out / 'accuracy.md'}, {out / 'accuracy.json'} and the runs in {out / 'runs'}"
    assert list(result["methods"]) == ["linear"]
    row = result["methods"]["linear"]
    assert row["auc"] == read_json(out / "runs" / "linear" / "results.json")["best"]["auc"]
    assert row["learnable_params"] == 2 * 64 * 3 + 3  # on the CLS token and the mean patch token
    assert result["setting"]["training"]["epochs"] == 1
    run = read_json(out / "runs" / "linear" / "run.json")  # the probe trains from preloaded embeddings
    assert run["cache_fingerprint"]["pooling"] == "cls+mean"
    assert run["training"]["cache_dir"] == str((tmp_path / "fpt-cache" / "linear").resolve())


def test_a_run_trained_with_other_settings_is_not_reused(
    tmp_path: Path, bench: tuple[Path, AccuracyBenchmark], image_data: Path, tiny_lpm_dir: Path
) -> None:
    out, _ = bench
    shutil.copytree(out, tmp_path / "out")
    training = benchmark_training(tmp_path / "cache", lr=0.5)
    with pytest.raises(FPTError, match=r"runs/linear was trained with other settings \(lr\)"):
        benchmark_accuracy(
            image_data, tmp_path / "out", METHODS, BackboneSpec(str(tiny_lpm_dir)), LPM_INPUT_SIZE, training
        )


def test_an_empty_method_list_is_refused(tmp_path: Path, image_data: Path, tiny_lpm_dir: Path) -> None:
    with pytest.raises(FPTError, match="at least one method"):
        benchmark_accuracy(
            image_data, tmp_path, [], BackboneSpec(str(tiny_lpm_dir)), 64, benchmark_training(tmp_path / "c")
        )


def test_runs_trained_on_other_data_are_not_reused(
    tmp_path: Path, bench: tuple[Path, AccuracyBenchmark], image_data: Path, tiny_lpm_dir: Path
) -> None:
    out, _ = bench
    shutil.copytree(out, tmp_path / "out")
    other_data = tmp_path / "other-data"
    shutil.copytree(image_data, other_data)
    with pytest.raises(FPTError, match=r"runs/linear was trained on .*, not .*other-data; choose another --out"):
        benchmark_accuracy(
            other_data,
            tmp_path / "out",
            METHODS,
            BackboneSpec(str(tiny_lpm_dir)),
            LPM_INPUT_SIZE,
            benchmark_training(tmp_path / "cache"),
        )


def test_an_lr_grid_reports_each_method_at_its_best_validation_learning_rate(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    backbone = BackboneSpec(str(tiny_lpm_dir))
    grid = [1e-5, 3e-3]
    out = tmp_path / "out"
    result = benchmark_accuracy(
        image_data, out, ["linear"], backbone, 64, benchmark_training(None, epochs=2), False, lr_grid=grid
    )

    scores = {}
    for lr in grid:
        run_dir = out / "runs" / "linear" / f"lr{lr:g}"
        assert read_json(run_dir / "run.json")["training"]["lr"] == lr
        scores[lr] = max(json.loads(line)["val_auc"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    row = result.methods["linear"]
    best = max(grid, key=lambda lr: scores[lr])  # max keeps the earlier of equal scores, as the benchmark does
    assert (row.lr, row.val_score) == (best, scores[best])
    chosen = read_json(out / "runs" / "linear" / f"lr{best:g}" / "results.json")
    assert row.auc == chosen["best"]["auc"]
    assert result.setting.lr_grid == grid
    table = (out / "accuracy.md").read_text().splitlines()
    assert "each method's best lr of 1e-05,0.003 on validation" in table[0]
    assert table[2].endswith("| train time | lr |") and table[4].endswith(f" {best:g} |")


@pytest.mark.parametrize(
    "options", [["--lr", "1e-3", "--lr-grid", "1e-4,1e-3"], ["--lr-grid", "1e-3", "--lr-scales", "1,3"]]
)
def test_only_one_of_lr_lr_grid_and_lr_scales_is_given(
    capsys: pytest.CaptureFixture[str], image_data: Path, options: list[str]
) -> None:
    assert main(["bench", "accuracy", str(image_data), *options]) == 1
    assert "give one of --lr, --lr-grid and --lr-scales" in capsys.readouterr().err
    unused = (image_data, Path("unused"), ["linear"], BackboneSpec("x"), 64, TrainingConfig())
    with pytest.raises(FPTError, match="the learning-rate grid needs one or more positive values"):
        benchmark_accuracy(*unused, lr_grid=[0])
    with pytest.raises(FPTError, match="the learning-rate scales needs one or more positive values"):
        benchmark_accuracy(*unused, lr_scales=[])
    with pytest.raises(FPTError, match="a learning-rate grid or learning-rate scales, not both"):
        benchmark_accuracy(*unused, lr_grid=[1e-3], lr_scales=[1.0])


def test_lr_scales_search_multiples_of_each_methods_own_default_learning_rate(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    out = tmp_path / "out"
    training = benchmark_training(None, lr=None)
    backbone = BackboneSpec(str(tiny_lpm_dir))
    result = benchmark_accuracy(image_data, out, ["linear"], backbone, 64, training, False, lr_scales=[0.1, 1.0])
    default = LinearProbeConfig.default_lr
    for lr in (0.1 * default, default):
        assert read_json(out / "runs" / "linear" / f"lr{lr:g}" / "run.json")["training"]["lr"] == lr
    assert result.methods["linear"].lr in (0.1 * default, default) and result.setting.lr_scales == [0.1, 1.0]
    assert "each method's best lr of 0.1,1 × its default on validation" in (out / "accuracy.md").read_text()


def test_the_cached_methods_share_one_lpm_pass_and_their_runs_compute_no_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    passes: list[list[int]] = []
    shared_pass = fpt.preload.preload_together

    def recorded(*args: Any, **kwargs: Any) -> list[PreloadSummary]:
        summaries = shared_pass(*args, **kwargs)
        passes.append([summary.computed for summary in summaries])
        return summaries

    monkeypatch.setattr(fpt.preload, "preload_together", recorded)
    monkeypatch.setattr(accuracy_benchmark, "preload_together", recorded)
    training = benchmark_training(tmp_path / "cache")
    benchmark_accuracy(
        image_data,
        tmp_path / "out",
        ("linear", "fpt+"),
        BackboneSpec(str(tiny_lpm_dir)),
        LPM_INPUT_SIZE,
        training,
        progress=False,
    )

    assert passes == [[NUM_IMAGES, NUM_IMAGES], [0], [0]]  # the shared pass, then each run's own finds all cached
