"""``fpt bench memory``: peak training-step memory, learnable parameters and step time, method by method.

Every method's step comes from ``fpt.bench.steps.training_step`` (random weights: memory does not depend
on their values) and is metered by both meters of ``fpt.bench.memory``. The simulated meter runs first;
the measured one is skipped, with a note, when the simulated peak would not fit in the device's free
memory. Ratios are to full fine-tuning on the same meter: r for learnable parameters (the LPM with the
task's head), m for peak memory. The measured meter runs on CPU or CUDA; the simulated one traces CPU
kernels whatever the device.
"""

from __future__ import annotations

import csv
import gc
import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from matplotlib.figure import Figure

from fpt.bench.memory import measure_training_step, simulate_training_step
from fpt.bench.steps import training_step
from fpt.cache import CACHE_DTYPES
from fpt.config import METERS, METHOD_VARIANTS, BackboneSpec, FullFineTuningConfig, check_method_variants
from fpt.errors import FPTError
from fpt.models.build import build_model
from fpt.render import MiB, mib, readable_size, save_figure
from fpt.runtime import progress_bar, select_device

FITS_FRACTION = 0.85  # of the free memory a measured step may need; the rest is the process's own
DPI = 120


@dataclass
class MethodMemory:
    """One method's row. ``peak_bytes`` is the measured peak, or the simulated one where measuring was skipped."""

    method: str
    learnable_params: int
    param_ratio: float  # r: learnable / full fine-tuning's learnable
    peak_bytes: int | None
    peak_meter: str | None
    measured_peak_bytes: int | None
    simulated_peak_bytes: int | None
    baseline_bytes: int | None  # alive before the step: weights, optimizer state, inputs
    step_seconds: float | None
    memory_ratio: float | None = None  # m: peak / full fine-tuning's peak on the same meter
    note: str | None = None


@dataclass
class MemorySetting:
    """What every row of one memory benchmark shares."""

    backbone: BackboneSpec
    input_size: int
    batch_size: int
    num_classes: int
    cache_dtype: str
    device: str
    machine: str
    torch: str
    full_fine_tuning_params: int
    grad_checkpointing: bool = False  # the side networks' blocks recomputed in backward


SettingT = TypeVar("SettingT")
RowT = TypeVar("RowT")


@dataclass
class BenchmarkResult(Generic[SettingT, RowT]):
    """A benchmark's result: the setting every row shares and one row per method, in the order asked."""

    setting: SettingT
    methods: dict[str, RowT]

    def to_dict(self) -> dict[str, Any]:
        """``{"setting": {...}, "methods": {NAME: {...}}}``, as written to JSON."""
        return asdict(self)


class MemoryBenchmark(BenchmarkResult[MemorySetting, MethodMemory]):
    """``benchmark_memory``'s result (``fpt bench memory --json`` prints its ``to_dict()``)."""


def benchmark_memory(
    backbone: BackboneSpec,
    input_size: int,
    batch_size: int,
    methods: Sequence[str] = METHOD_VARIANTS,
    meters: Sequence[str] = METERS,
    device: str = "cpu",
    num_classes: int = 5,
    cache_dtype: torch.dtype = torch.float16,
    grad_checkpointing: bool = False,
    *,
    progress: bool = True,
) -> MemoryBenchmark:
    """Meter one training step of every method (``METHOD_VARIANTS`` names).

    ``cache_dtype`` is the dtype of FPT's cached keys/values; every step runs in float32. ``grad_checkpointing``
    recomputes the side networks' blocks in backward (the other methods, full fine-tuning among them, as they are).
    """
    check_method_variants(list(methods))
    if not meters or any(m not in METERS for m in meters):
        raise FPTError(f"meters must be among {', '.join(METERS)}")
    if batch_size < 1 or num_classes < 1:
        raise FPTError(f"the batch size and the number of classes must be positive (got {batch_size}, {num_classes})")
    if cache_dtype not in CACHE_DTYPES.values():
        raise FPTError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
    target = select_device(device)
    if "measured" in meters and target.type not in ("cpu", "cuda"):
        raise FPTError(f"the measured meter reads CPU or CUDA memory, not {target.type}; use --device cpu or cuda")
    full_learnable = full_fine_tuning_params(backbone, num_classes, input_size)
    rows = []
    for method in progress_bar(methods, enabled=progress, desc="memory", unit="method"):
        step = training_step(method, backbone, input_size, batch_size, num_classes, cache_dtype, grad_checkpointing)
        simulated = simulate_training_step(step.model, step.loss, step.inputs) if "simulated" in meters else None
        measured, note = None, None
        if "measured" in meters:
            needed = simulated.peak_bytes if simulated else None
            free = free_memory_bytes(target)
            if needed is not None and free is not None and needed > FITS_FRACTION * free:
                note = f"measured skipped: needs {readable_size(needed)}, {readable_size(free)} free on {target}"
            else:
                step.to(target)
                measured = measure_training_step(step.model, step.loss, step.inputs)
        chosen = measured or simulated
        rows.append(
            MethodMemory(
                method=method,
                learnable_params=step.learnable_params,
                param_ratio=step.learnable_params / full_learnable,
                peak_bytes=chosen.peak_bytes if chosen else None,
                peak_meter=("measured" if measured else "simulated") if chosen else None,
                measured_peak_bytes=measured.peak_bytes if measured else None,
                simulated_peak_bytes=simulated.peak_bytes if simulated else None,
                baseline_bytes=chosen.baseline_bytes if chosen else None,
                step_seconds=measured.step_seconds if measured else None,
                note=note,
            )
        )
        del step
    _add_memory_ratios(rows)
    setting = MemorySetting(
        backbone=backbone,
        input_size=input_size,
        batch_size=batch_size,
        num_classes=num_classes,
        cache_dtype=str(cache_dtype).removeprefix("torch."),
        grad_checkpointing=grad_checkpointing,
        device=str(target),
        machine=machine_description(target),
        torch=torch.__version__,
        full_fine_tuning_params=full_learnable,
    )
    return MemoryBenchmark(setting, {row.method: row for row in rows})


def benchmark_memory_sweep(
    backbone: BackboneSpec, input_sizes: Sequence[int], *args: Any, progress: bool = True, **options: Any
) -> list[MemoryBenchmark]:
    """``benchmark_memory`` at every input size (other arguments as for it)."""
    results = []
    for size in input_sizes:
        if progress and len(input_sizes) > 1:
            print(f"input size {size} px")
        results.append(benchmark_memory(backbone, size, *args, progress=progress, **options))
    return results


def write_memory_outputs(
    results: Sequence[MemoryBenchmark], out: str | Path, plot: str | None = None, sweep: bool = False
) -> list[Path]:
    """The files ``fpt bench memory`` writes into ``out``: with ``sweep``, ``memory_sweep.csv`` and
    ``memory_sweep.png``; with ``plot`` (a PNG name), one bar chart per result (``<stem>_<size>px.png`` when
    there are several)."""
    out = Path(out)
    written = []
    if sweep:
        written += [write_sweep_csv(results, out / "memory_sweep.csv"), plot_sweep(results, out / "memory_sweep.png")]
    if plot:
        for result in results:
            name = f"{Path(plot).stem}_{result.setting.input_size}px.png" if len(results) > 1 else plot
            written.append(plot_memory(result, out / name))
    return written


def _add_memory_ratios(rows: list[MethodMemory]) -> None:
    """m per row against full fine-tuning's peak on the same meter (measured if both have it)."""
    full = next((row for row in rows if row.method == FullFineTuningConfig.method), None)
    if full is None:
        return
    for row in rows:
        for meter in ("measured_peak_bytes", "simulated_peak_bytes"):
            if getattr(row, meter) and getattr(full, meter):
                row.memory_ratio = getattr(row, meter) / getattr(full, meter)
                break


def full_fine_tuning_params(backbone: BackboneSpec, num_classes: int, input_size: int) -> int:
    """Learnable parameters of full fine-tuning: the whole LPM with a ``num_classes`` head (counted on meta)."""
    with torch.device("meta"):
        config = FullFineTuningConfig(backbone=backbone, num_classes=num_classes, lpm_input_size=input_size)
        return build_model(config, pretrained_lpm=False).num_learnable_params()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a step could still use on ``device`` (free CUDA memory, else the host's available memory), or
    None where the system does not say."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()  # memory cached by earlier steps is free for this one
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name (macOS)
        return None


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def format_memory_table(result: MemoryBenchmark) -> str:
    """A Markdown table of ``benchmark_memory``'s result."""
    setting = result.setting
    lines = [
        f"{setting.backbone.name}, {setting.input_size} px, batch {setting.batch_size}, "
        f"{setting.num_classes} classes, {setting.cache_dtype} cache"
        f"{', side blocks recomputed in backward' if setting.grad_checkpointing else ''}; "
        f"{setting.device} ({setting.machine}), torch {setting.torch}",
        "",
        "| method | learnable params | r | measured peak (MiB) | simulated peak (MiB) | m (% of full) | step (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for name, row in result.methods.items():
        measured = mib(row.measured_peak_bytes, unit=False) if row.measured_peak_bytes else "n/a"
        if row.note:
            measured = "skipped*"
            notes.append(f"\\* {name}: {row.note}")
        simulated = mib(row.simulated_peak_bytes, unit=False) if row.simulated_peak_bytes else "n/a"
        ratio = f"{100 * row.memory_ratio:.2f} %" if row.memory_ratio is not None else "n/a"
        seconds = f"{row.step_seconds:.2f}" if row.step_seconds is not None else "n/a"
        lines.append(
            f"| {name} | {row.learnable_params:,} | {100 * row.param_ratio:.2f} % | {measured} | "
            f"{simulated} | {ratio} | {seconds} |"
        )
    return "\n".join(lines + (["", *notes] if notes else []))


def write_sweep_csv(results: Sequence[MemoryBenchmark], path: str | Path) -> Path:
    """One row per (input size, method): learnable parameters and both meters' peaks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input_size", "method", "learnable_params", "measured_peak_bytes", "simulated_peak_bytes"])
        for result in results:
            for name, row in result.methods.items():
                writer.writerow(
                    [
                        result.setting.input_size,
                        name,
                        row.learnable_params,
                        row.measured_peak_bytes or "",
                        row.simulated_peak_bytes or "",
                    ]
                )
    return path


def plot_memory(result: MemoryBenchmark, path: str | Path) -> Path:
    """A bar chart (log scale) of each method's peak training-step memory."""
    names = [name for name, row in result.methods.items() if row.peak_bytes]
    peaks = [result.methods[name].peak_bytes / MiB for name in names]
    setting = result.setting
    figure = Figure(figsize=(8, 4))
    axis = figure.subplots()
    axis.barh(names, peaks, color="#4c72b0")
    axis.set_xscale("log")
    axis.invert_yaxis()
    axis.set_xlabel("peak training-step memory (MiB, log scale)")
    axis.set_title(f"{_backbone_label(setting)}, {setting.input_size} px, batch {setting.batch_size}")
    axis.set_xlim(right=max(peaks) * 3)  # room for the labels
    for y, peak in enumerate(peaks):
        axis.text(peak, y, f" {peak:,.0f}", va="center", fontsize=8)
    return save_figure(figure, path, DPI)


def plot_sweep(results: Sequence[MemoryBenchmark], path: str | Path) -> Path:
    """Peak memory against input size, one line per method (measured where run, else simulated)."""
    figure = Figure(figsize=(8, 5))
    axis = figure.subplots()
    for name in results[0].methods:
        points = [
            (result.setting.input_size, result.methods[name].peak_bytes / MiB)
            for result in results
            if result.methods[name].peak_bytes
        ]
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    setting = results[0].setting
    sizes = [result.setting.input_size for result in results]
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.set_xlabel("LPM input size (px)")
    axis.set_ylabel("peak training-step memory (MiB)")
    axis.set_title(f"{_backbone_label(setting)}, batch {setting.batch_size}")
    axis.legend(fontsize=8)
    axis.grid(True, which="both", alpha=0.3)
    return save_figure(figure, path, DPI)


def _backbone_label(setting: MemorySetting) -> str:
    """The backbone's name, or the folder name of a local checkpoint directory."""
    name = setting.backbone.name
    return Path(name).name if Path(name).is_absolute() else name
