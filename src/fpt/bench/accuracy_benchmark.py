"""``fpt bench accuracy``: train several methods on one dataset with identical settings, side by side.

Each method trains into ``OUT/runs/<method>`` with the same ``TrainingConfig``; FPT and FPT+ keep their
feature caches (different tapped layers) in ``CACHE/<method>``. A finished run is reused and an
interrupted one resumed, so rerunning the command continues where it stopped. The table adds, from
``fpt bench memory``'s harness at the same backbone, resolution, batch size and class count, each
method's learnable parameters and peak training-step memory, and the efficiency scores of the
original work:

    PPE = AUC · exp(−log10(r + 1)),   PME = AUC · exp(−log10(m + 1)),

with r and m the learnable-parameter and peak-memory ratios to full fine-tuning (r = m = 1 for it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fpt.bench.memory_benchmark import BenchmarkResult, MemorySetting, benchmark_memory
from fpt.config import (
    BackboneSpec,
    FullFineTuningConfig,
    MethodConfig,
    TrainingConfig,
    check_method_variants,
    method_variant,
)
from fpt.errors import FPTError
from fpt.evaluate import RunResults
from fpt.render import mib
from fpt.run import RESULTS_FILE, RUN_FILE, Run, read_metrics
from fpt.runtime import select_device
from fpt.train import resume, train

RESULTS_JSON = "accuracy.json"
RESULTS_TABLE = "accuracy.md"


@dataclass
class AccuracyRow:
    """One method: test metrics of its best checkpoint, its cost, and the efficiency scores."""

    auc: float | None
    accuracy: float
    kappa: float
    best_epoch: int | None
    learnable_params: int
    param_ratio: float
    peak_bytes: int | None
    peak_meter: str | None
    memory_ratio: float | None
    ppe: float | None
    pme: float | None
    train_seconds: float


@dataclass
class AccuracySetting:
    data: str
    backbone: BackboneSpec
    lpm_input_size: int
    training: TrainingConfig
    memory: MemorySetting
    full_fine_tuning_peak_bytes: int | None


class AccuracyBenchmark(BenchmarkResult[AccuracySetting, AccuracyRow]):
    """``benchmark_accuracy``'s result (``accuracy.json`` holds its ``to_dict()``)."""


def efficiency_score(auc: float, ratio: float) -> float:
    """AUC · exp(−log10(ratio + 1)): PPE with the parameter ratio r, PME with the memory ratio m."""
    return auc * math.exp(-math.log10(ratio + 1.0))


def benchmark_accuracy(
    data: str | Path,
    out: str | Path,
    methods: Sequence[str],
    backbone: BackboneSpec,
    lpm_input_size: int,
    training: TrainingConfig,
    progress: bool = True,
) -> AccuracyBenchmark:
    """Train (or reuse, or resume) every method on ``data`` and write ``OUT/accuracy.json`` and ``accuracy.md``."""
    if not methods:
        raise FPTError("give at least one method to train")
    check_method_variants(list(methods))
    out = Path(out)
    outcomes: dict[str, tuple[RunResults, float]] = {}
    for index, method in enumerate(methods, start=1):
        run_dir = out / "runs" / method.replace("/", "-")
        if progress:
            print(f"[{index}/{len(methods)}] {method} -> {run_dir}")
        config_class, _ = method_variant(method)
        config = config_class(backbone=backbone, num_classes=1, lpm_input_size=lpm_input_size)
        method_training = replace(training, cache_dir=_method_cache(training.cache_dir, method))
        if (run_dir / RUN_FILE).is_file():
            _check_same_settings(run_dir, data, config, method_training)
        if (run_dir / RESULTS_FILE).is_file():
            results = RunResults.load(run_dir)
        elif (run_dir / RUN_FILE).is_file():
            results = resume(run_dir, training.device, training.num_workers, progress=progress)
        else:
            results = train(data, run_dir, config, method_training, progress=progress)
        outcomes[method] = (results, sum(record["seconds"] for record in read_metrics(run_dir)))

    num_classes = len(next(iter(outcomes.values()))[0].classes)
    full = FullFineTuningConfig.method  # the reference of the ratios r and m
    metered = list(methods) if full in methods else [full, *methods]
    # one float32 step with the training's cache dtype, metered on CUDA if training ran there, else on the CPU
    memory = benchmark_memory(
        backbone,
        lpm_input_size,
        training.batch_size,
        metered,
        device="cuda" if select_device(training.device).type == "cuda" else "cpu",
        num_classes=num_classes,
        cache_dtype=getattr(torch, training.cache_dtype),
        progress=progress,
    )
    rows = {}
    for method, (results, seconds) in outcomes.items():
        best, cost = results.best, memory.methods[method]
        auc = best["auc"]
        rows[method] = AccuracyRow(
            auc=auc,
            accuracy=best["accuracy"],
            kappa=best["kappa"],
            best_epoch=results.best_epoch,
            learnable_params=cost.learnable_params,
            param_ratio=cost.param_ratio,
            peak_bytes=cost.peak_bytes,
            peak_meter=cost.peak_meter,
            memory_ratio=cost.memory_ratio,
            ppe=efficiency_score(auc, cost.param_ratio) if auc is not None else None,
            pme=efficiency_score(auc, cost.memory_ratio) if auc is not None else None,
            train_seconds=seconds,
        )
    setting = AccuracySetting(
        data=str(Path(data).resolve()),
        backbone=backbone,
        lpm_input_size=lpm_input_size,
        training=training,
        memory=memory.setting,
        full_fine_tuning_peak_bytes=memory.methods[full].peak_bytes,
    )
    result = AccuracyBenchmark(setting, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / RESULTS_TABLE).write_text(format_accuracy_table(result) + "\n")
    return result


def format_accuracy_table(result: AccuracyBenchmark) -> str:
    """A Markdown table of ``benchmark_accuracy``'s result (metrics of each run's best checkpoint, test split)."""
    setting, training, memory = result.setting, result.setting.training, result.setting.memory
    lines = [
        f"{setting.backbone.name} at {setting.lpm_input_size} px on {setting.data}; "
        f"{training.epochs} epochs, lr {training.lr}, batch {training.batch_size}, seed {training.seed}; "
        f"memory: one float32 step on {memory.device} ({memory.machine}), torch {memory.torch}",
        "",
        "| method | test AUC | accuracy | kappa | learnable | r | peak memory | m | PPE | PME | train time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result.methods.items():
        lines.append(
            f"| {name} | {_fixed(row.auc)} | {_fixed(row.accuracy)} | {_fixed(row.kappa)} | "
            f"{row.learnable_params:,} | {100 * row.param_ratio:.2f} % | "
            f"{mib(row.peak_bytes)} ({row.peak_meter}) | {_percent(row.memory_ratio)} | "
            f"{_fixed(row.ppe)} | {_fixed(row.pme)} | {row.train_seconds:.0f} s |"
        )
    return "\n".join(lines)


def _method_cache(cache_dir: str | None, method: str) -> str | None:
    """The method's own feature cache folder under ``cache_dir`` (None without a cache or for a variant that runs
    the LPM in every step instead of caching it)."""
    config_class, cached = method_variant(method)
    if cache_dir is None or (config_class.cacheable and not cached):
        return None
    return str(Path(cache_dir) / method)


def _check_same_settings(run_dir: Path, data: str | Path, config: MethodConfig, training: TrainingConfig) -> None:
    """Refuse to reuse or resume a run trained otherwise than asked (where it ran and cached may differ)."""
    run = Run.load(run_dir)
    if run.data_source != str(Path(data).resolve()):
        raise FPTError(f"{run_dir} was trained on {run.data_source}, not {data}; choose another --out")
    recorded, wanted = run.training.to_dict(), training.to_dict()
    where = ("device", "num_workers", "cache_dir")
    differs = [name for name in wanted if name not in where and recorded[name] != wanted[name]]
    if (recorded["cache_dir"] is None) != (wanted["cache_dir"] is None):
        differs.append("cache_dir")
    for name in ("backbone", "lpm_input_size"):
        if getattr(run.model_config, name) != getattr(config, name):
            differs.append(name)
    if run.model_config.method != config.method:
        differs.append("method")
    if differs:
        raise FPTError(
            f"{run_dir} was trained with other settings ({', '.join(differs)}); choose another --out, or delete "
            "that run to train it again"
        )


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"
