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
    DEFAULT_EPOCHS,
    BackboneSpec,
    FullFineTuningConfig,
    MethodConfig,
    TrainingConfig,
    check_method_variants,
    method_variant,
)
from fpt.distributed import refuse_under_torchrun
from fpt.errors import FPTError
from fpt.evaluate import RunResults
from fpt.models.build import build_model
from fpt.preload import preload_together
from fpt.render import mib
from fpt.run import RESULTS_FILE, RUN_FILE, Run, read_metrics
from fpt.runtime import select_device
from fpt.task import prepare
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
    lr: float  # the run's learning rate: with a grid, the one of the best validation score
    val_score: float | None  # that run's best validation score (the training's selection metric)


@dataclass
class AccuracySetting:
    data: str
    backbone: BackboneSpec
    lpm_input_size: int
    training: TrainingConfig
    memory: MemorySetting
    full_fine_tuning_peak_bytes: int | None
    lr_grid: list[float] | None = None
    lr_scales: list[float] | None = None


class AccuracyBenchmark(BenchmarkResult[AccuracySetting, AccuracyRow]):
    """``benchmark_accuracy``'s result (``accuracy.json`` holds its ``to_dict()``)."""


def efficiency_score(auc: float, ratio: float) -> float:
    """AUC · exp(−log10(ratio + 1)): PPE with the parameter ratio r, PME with the memory ratio m."""
    return auc * math.exp(-math.log10(ratio + 1.0))


@dataclass
class _Outcome:
    results: RunResults
    seconds: float
    lr: float
    val_score: float | None


def benchmark_accuracy(
    data: str | Path,
    out: str | Path,
    methods: Sequence[str],
    backbone: BackboneSpec,
    lpm_input_size: int,
    training: TrainingConfig,
    progress: bool = True,
    lr_grid: Sequence[float] | None = None,
    lr_scales: Sequence[float] | None = None,
) -> AccuracyBenchmark:
    """Train (or reuse, or resume) every method on ``data`` and write ``OUT/accuracy.json`` and ``accuracy.md``.

    With ``lr_grid`` (learning rates) or ``lr_scales`` (multiples of each method's own default learning rate,
    for methods whose good rates lie decades apart), every method trains once per learning rate (into
    ``OUT/runs/<method>/lr<lr>``) and is reported at the one whose run reached the best validation score
    (``training.selection_metric``), so that each method gets its own best learning rate; the test split plays
    no part in that choice.
    """
    refuse_under_torchrun("`fpt bench accuracy`")
    if not methods:
        raise FPTError("give at least one method to train")
    check_method_variants(list(methods))
    if lr_grid is not None and lr_scales is not None:
        raise FPTError("give a learning-rate grid or learning-rate scales, not both")
    for name, values in (("grid", lr_grid), ("scales", lr_scales)):
        if values is not None and (not values or min(values) <= 0):
            raise FPTError(f"the learning-rate {name} needs one or more positive values")
    out = Path(out)
    plan: dict[str, tuple[MethodConfig, list[tuple[float, Path]]]] = {}
    for method in methods:
        config_class, _ = method_variant(method)
        config = config_class(backbone=backbone, num_classes=1, lpm_input_size=lpm_input_size)
        default_lr = _method_training(training, config_class).lr
        searched = lr_grid or (lr_scales and [default_lr * scale for scale in lr_scales])
        run_dir = out / "runs" / method.replace("/", "-")
        plan[method] = config, [(lr, run_dir / f"lr{lr:g}" if searched else run_dir) for lr in searched or [default_lr]]
    _preload_shared(data, plan, training, progress)
    outcomes: dict[str, _Outcome] = {}
    for index, (method, (config, runs)) in enumerate(plan.items(), start=1):
        candidates = []
        for lr, run_dir in runs:
            if progress:
                print(f"[{index}/{len(methods)}] {method} -> {run_dir}")
            method_training = replace(training, lr=lr, cache_dir=_method_cache(training.cache_dir, method))
            method_training = _method_training(method_training, type(config))
            results = _trained(run_dir, data, config, method_training, progress)
            records = read_metrics(run_dir)
            scores = [r[f"val_{training.selection_metric}"] for r in records if r[f"val_{training.selection_metric}"]]
            seconds = sum(record["seconds"] for record in records)
            candidates.append(_Outcome(results, seconds, lr, max(scores) if scores else None))
        # the best validation score; ties (and runs without one) go to the earlier learning rate
        outcomes[method] = max(candidates, key=lambda c: -math.inf if c.val_score is None else c.val_score)

    num_classes = len(next(iter(outcomes.values())).results.classes)
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
    for method, outcome in outcomes.items():
        results, seconds = outcome.results, outcome.seconds
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
            lr=outcome.lr,
            val_score=outcome.val_score,
        )
    setting = AccuracySetting(
        data=str(Path(data).resolve()),
        backbone=backbone,
        lpm_input_size=lpm_input_size,
        training=training,
        memory=memory.setting,
        full_fine_tuning_peak_bytes=memory.methods[full].peak_bytes,
        lr_grid=list(lr_grid) if lr_grid else None,
        lr_scales=list(lr_scales) if lr_scales else None,
    )
    result = AccuracyBenchmark(setting, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (out / RESULTS_TABLE).write_text(format_accuracy_table(result) + "\n")
    return result


def format_accuracy_table(result: AccuracyBenchmark) -> str:
    """A Markdown table of ``benchmark_accuracy``'s result (metrics of each run's best checkpoint, test split)."""
    setting, training, memory = result.setting, result.setting.training, result.setting.memory
    grid, scales = setting.lr_grid, setting.lr_scales
    lr_column = bool(grid or scales) or training.lr is None  # the methods' learning rates may differ
    if grid:
        lr = f"each method's best lr of {','.join(f'{value:g}' for value in grid)} on validation"
    elif scales:
        lr = f"each method's best lr of {','.join(f'{value:g}' for value in scales)} × its default on validation"
    else:
        lr = f"lr {training.lr:g}" if training.lr is not None else "each method's default lr"
    lines = [
        f"{setting.backbone.name} at {setting.lpm_input_size} px on {setting.data}; "
        f"{_schedule(training)}, {lr}, batch {training.batch_size}, seed {training.seed}; "
        f"memory: one float32 step on {memory.device} ({memory.machine}), torch {memory.torch}",
        "",
        "| method | test AUC | accuracy | kappa | learnable | r | peak memory | m | PPE | PME | train time |"
        + (" lr |" if lr_column else ""),
        "| --- |" + " ---: |" * (10 + lr_column),
    ]
    for name, row in result.methods.items():
        lines.append(
            f"| {name} | {_fixed(row.auc)} | {_fixed(row.accuracy)} | {_fixed(row.kappa)} | "
            f"{row.learnable_params:,} | {100 * row.param_ratio:.2f} % | "
            f"{mib(row.peak_bytes)} ({row.peak_meter}) | {_percent(row.memory_ratio)} | "
            f"{_fixed(row.ppe)} | {_fixed(row.pme)} | {row.train_seconds:.0f} s |"
            + (f" {row.lr:g} |" if lr_column else "")
        )
    return "\n".join(lines)


def _trained(
    run_dir: Path, data: str | Path, config: MethodConfig, training: TrainingConfig, progress: bool
) -> RunResults:
    """The results of the run in ``run_dir``: reused when finished, resumed when interrupted, else trained."""
    if (run_dir / RUN_FILE).is_file():
        _check_same_settings(run_dir, data, config, training)
    if (run_dir / RESULTS_FILE).is_file():
        return RunResults.load(run_dir)
    if (run_dir / RUN_FILE).is_file():
        return resume(run_dir, training.device, training.num_workers, progress=progress)
    return train(data, run_dir, config, training, progress=progress)


def _method_training(training: TrainingConfig, config_class: type[MethodConfig]) -> TrainingConfig:
    """``training`` resolved for one method of the benchmark; gradient checkpointing only where it applies (the
    side networks)."""
    checkpointing = training.grad_checkpointing and config_class.side_network
    return replace(training, grad_checkpointing=checkpointing).for_method(config_class)


def _preload_shared(
    data: str | Path,
    plan: dict[str, tuple[MethodConfig, list[tuple[float, Path]]]],
    training: TrainingConfig,
    progress: bool,
) -> None:
    """Fill the caches of the cached methods that still have runs to train from one LPM pass (each run would
    otherwise preload its own)."""
    caches = {method: _method_cache(training.cache_dir, method) for method in plan}
    pending = [
        (config, replace(training, cache_dir=caches[method]))
        for method, (config, runs) in plan.items()
        if caches[method] is not None and any(not (run_dir / RESULTS_FILE).is_file() for _, run_dir in runs)
    ]
    if len(pending) < 2:
        return
    if progress:
        print(f"preloading the LPM's features for {', '.join(c.method for c, _ in pending)} in one pass")
    (first_config, first_training), *others = pending
    dataset, first, normalization = prepare(data, first_config, first_training, progress)
    targets = [(first, first_training), *((build_model(c, load_lpm=False), t) for c, t in others)]
    preload_together(targets, dataset, normalization, progress=progress)


def _method_cache(cache_dir: str | None, method: str) -> str | None:
    """The method's own feature cache folder under ``cache_dir`` (None without a cache, for a method that reads no
    LPM features, as side-only, or for a variant that runs the LPM in every step instead of caching it)."""
    _, cached = method_variant(method)
    if cache_dir is None or not cached:
        return None
    return str(Path(cache_dir) / method)


def _check_same_settings(run_dir: Path, data: str | Path, config: MethodConfig, training: TrainingConfig) -> None:
    """Refuse to reuse or resume a run trained otherwise than asked (where it ran and cached, and whether it
    recomputed its side blocks, which gives the same run, may differ)."""
    run = Run.load(run_dir)
    if run.data_source != str(Path(data).resolve()):
        raise FPTError(f"{run_dir} was trained on {run.data_source}, not {data}; choose another --out")
    recorded, wanted = run.training.to_dict(), training.to_dict()
    where = ("device", "num_workers", "cache_dir", "grad_checkpointing")
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


def _schedule(training: TrainingConfig) -> str:
    """The schedule as asked for, e.g. "20 epochs, at least each method's default steps"."""
    epochs = f"{DEFAULT_EPOCHS if training.epochs is None else training.epochs} epochs"
    if training.min_steps:
        return f"{epochs}, at least {training.min_steps} steps"
    if training.min_steps is None and training.epochs is None:
        return f"{epochs}, at least each method's default steps"
    return epochs


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"
