"""`fpt bench memory`: per-method rows against each method's training step, the ratios to full fine-tuning,
the meters (both, one, measuring skipped with a note), the sweep CSV, the plots and the command line."""

from __future__ import annotations

import copy
import csv
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import fpt.bench.memory_benchmark as memory_benchmark
from fpt.bench.memory_benchmark import (
    FITS_FRACTION,
    MemoryBenchmark,
    MiB,
    benchmark_memory,
    format_memory_table,
    free_memory_bytes,
    full_fine_tuning_params,
    plot_memory,
    plot_sweep,
    write_sweep_csv,
)
from fpt.bench.steps import training_step
from fpt.cli import main
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from tests.bench.test_memory import KERNEL_WORKSPACE, PATCH16

pytest_plugins = ("tests.pipeline_fixtures",)

METHODS = ("full", "linear", "lora", "fpt+", "side-only", "fpt+/no-cache")
INPUT_SIZE, BATCH_SIZE, NUM_CLASSES = 64, 2, 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def vit_params(width: int, depth: int, patch: int, tokens: int, classes: int, mlp_ratio: int = 4) -> int:
    """Parameters of a timm ViT (qkv bias, CLS token, learned position embeddings) with a ``classes`` head."""
    mlp = mlp_ratio * width
    block = 2 * width + (width * 3 * width + 3 * width) + (width * width + width)
    block += 2 * width + (width * mlp + mlp) + (mlp * width + width)
    embedding = (3 * patch * patch * width + width) + width + tokens * width
    return embedding + depth * block + 2 * width + (width * classes + classes)


# PATCH16: 64 wide, 4 blocks, patch 16, 64 px position embeddings (1 + 16 tokens); a 3-class head
TINY_FULL_PARAMS = vit_params(64, 4, 16, 17, NUM_CLASSES)


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture(scope="module")
def tiny_result() -> MemoryBenchmark:
    """Both meters on every method of METHODS, tiny backbone, 64 px, batch 2, 3 classes, on the CPU."""
    return benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, METHODS, num_classes=NUM_CLASSES, progress=False)


def test_setting_records_the_backbone_geometry_device_and_full_fine_tunings_parameters(
    tiny_result: MemoryBenchmark,
) -> None:
    setting = tiny_result.setting
    assert setting.backbone.to_dict() == PATCH16.to_dict()
    assert (setting.input_size, setting.batch_size, setting.num_classes) == (64, 2, 3)
    assert setting.device == "cpu"
    assert setting.torch == torch.__version__
    assert f"{os.cpu_count()} cores" in setting.machine
    assert setting.full_fine_tuning_params == TINY_FULL_PARAMS == 250_627
    assert list(tiny_result.methods) == list(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_learnable_parameters_and_ratio_come_from_the_methods_training_step(
    tiny_result: MemoryBenchmark, method: str
) -> None:
    row = tiny_result.methods[method]
    expected = training_step(method, PATCH16, INPUT_SIZE, BATCH_SIZE, NUM_CLASSES).learnable_params
    assert row.method == method
    assert row.learnable_params == expected
    assert row.param_ratio == expected / full_fine_tuning_params(PATCH16, NUM_CLASSES, INPUT_SIZE)


def test_full_fine_tuning_has_both_ratios_one_and_the_others_learn_less(tiny_result: MemoryBenchmark) -> None:
    rows = tiny_result.methods
    assert rows["full"].param_ratio == 1.0
    assert rows["full"].memory_ratio == 1.0
    assert rows["linear"].learnable_params == 2 * 64 * NUM_CLASSES + NUM_CLASSES  # the head on CLS + mean token
    for method in METHODS[1:]:
        assert 0 < rows[method].param_ratio < 0.1
        assert 0 < rows[method].memory_ratio < 1.0
    # cached keys/values replace the LPM's forward pass: the step without the cache needs more
    assert rows["fpt+/no-cache"].learnable_params == rows["fpt+"].learnable_params
    assert rows["fpt+/no-cache"].peak_bytes > rows["fpt+"].peak_bytes


@pytest.mark.parametrize("method", METHODS)
def test_both_meters_ran_and_agree_within_kernel_workspace(tiny_result: MemoryBenchmark, method: str) -> None:
    row = tiny_result.methods[method]
    assert row.peak_meter == "measured"
    assert row.peak_bytes == row.measured_peak_bytes
    assert abs(row.measured_peak_bytes - row.simulated_peak_bytes) <= KERNEL_WORKSPACE
    assert 0 < row.baseline_bytes < row.peak_bytes
    assert row.step_seconds > 0
    assert row.note is None


def test_memory_ratio_is_the_measured_peak_over_full_fine_tunings(tiny_result: MemoryBenchmark) -> None:
    rows = tiny_result.methods
    full = rows["full"].measured_peak_bytes
    for method in METHODS:
        assert rows[method].memory_ratio == rows[method].measured_peak_bytes / full


def test_simulated_meter_alone_reports_simulated_peaks_and_no_step_time(tiny_result: MemoryBenchmark) -> None:
    methods = ["full", "linear", "fpt+"]
    result = benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, methods, ["simulated"], num_classes=3, progress=False)

    rows = result.methods
    for method in methods:
        row = rows[method]
        assert row.measured_peak_bytes is None
        assert row.step_seconds is None
        assert row.peak_meter == "simulated"
        assert row.peak_bytes == row.simulated_peak_bytes
        # fake tensors trace the same step however often: the same peak as beside the measured meter
        assert row.simulated_peak_bytes == tiny_result.methods[method].simulated_peak_bytes
        assert row.memory_ratio == row.simulated_peak_bytes / rows["full"].simulated_peak_bytes
        assert row.note is None


def test_measured_meter_alone_always_runs(tiny_result: MemoryBenchmark, monkeypatch: pytest.MonkeyPatch) -> None:
    # without a simulated peak there is nothing to compare with the free memory, so nothing is skipped
    monkeypatch.setattr(memory_benchmark, "free_memory_bytes", lambda device: 1)
    result = benchmark_memory(
        PATCH16, INPUT_SIZE, BATCH_SIZE, ["full", "linear"], ["measured"], num_classes=3, progress=False
    )

    for method, row in result.methods.items():
        assert row.simulated_peak_bytes is None
        assert row.peak_meter == "measured"
        assert row.peak_bytes == row.measured_peak_bytes == tiny_result.methods[method].measured_peak_bytes
        assert row.note is None
    assert result.methods["linear"].memory_ratio == pytest.approx(tiny_result.methods["linear"].memory_ratio)


def test_measuring_is_skipped_with_a_note_where_the_step_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    free = 512 * 1024  # below every method's simulated peak (the smallest is over 0.6 MiB)
    asked: list[torch.device] = []

    def tiny_free_memory(device: torch.device) -> int:
        asked.append(device)
        return free

    monkeypatch.setattr(memory_benchmark, "free_memory_bytes", tiny_free_memory)
    methods = ["full", "lora", "fpt+"]
    result = benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, methods, num_classes=NUM_CLASSES, progress=False)

    assert asked == [torch.device("cpu")] * len(methods)
    rows = result.methods
    for method in methods:
        row = rows[method]
        needed = row.simulated_peak_bytes
        assert needed > FITS_FRACTION * free
        assert row.note == f"measured skipped: needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on cpu"
        assert row.measured_peak_bytes is None and row.step_seconds is None
        assert row.peak_meter == "simulated"
        assert row.peak_bytes == needed
        assert row.memory_ratio == needed / rows["full"].simulated_peak_bytes

    table = format_memory_table(result).splitlines()
    for method in methods:
        line = next(line for line in table if line.startswith(f"| {method} |"))
        assert "| skipped* |" in line
        assert f"| {rows[method].simulated_peak_bytes / MiB:,.1f} |" in line
        assert line.endswith("| n/a |")  # no step time
    assert table[-len(methods) :] == [f"\\* {m}: {rows[m].note}" for m in methods]
    assert table[-len(methods) - 1] == ""


def test_memory_ratios_stay_on_full_fine_tunings_meter_when_only_full_is_skipped(
    tiny_result: MemoryBenchmark, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_simulated = tiny_result.methods["full"].simulated_peak_bytes
    free = int(full_simulated / FITS_FRACTION) - 1  # just too little for full fine-tuning, plenty for the rest
    monkeypatch.setattr(memory_benchmark, "free_memory_bytes", lambda device: free)
    methods = ["full", "linear", "fpt+"]
    result = benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, methods, num_classes=NUM_CLASSES, progress=False)

    rows = result.methods
    assert rows["full"].peak_meter == "simulated" and rows["full"].note.startswith("measured skipped: ")
    assert rows["full"].memory_ratio == 1.0
    for method in ("linear", "fpt+"):
        assert rows[method].peak_meter == "measured" and rows[method].note is None
        # full has no measured peak, so the ratio compares the simulated peaks of both
        assert rows[method].memory_ratio == rows[method].simulated_peak_bytes / full_simulated
    table = format_memory_table(result).splitlines()
    assert table[-1] == f"\\* full: {rows['full'].note}"
    assert sum("skipped*" in line for line in table) == 1


def test_without_full_fine_tuning_there_are_no_memory_ratios() -> None:
    result = benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, ["linear"], ["simulated"], num_classes=3, progress=False)
    row = result.methods["linear"]
    assert row.memory_ratio is None
    assert row.param_ratio == row.learnable_params / TINY_FULL_PARAMS  # r needs no full run
    assert "| 0.15 % |" in format_memory_table(result) and "| n/a |" in format_memory_table(result)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"methods": ["linear", "nope"]}, "unknown method(s) nope; choose from full, linear"),
        ({"meters": ["nope"]}, "meters must be among measured, simulated"),
        ({"meters": []}, "meters must be among measured, simulated"),
    ],
    ids=["method", "meter", "no-meter"],
)
def test_unknown_methods_and_meters_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(FPTError) as error:
        benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, **options)
    assert message in str(error.value)


def test_format_memory_table_lists_every_method_with_its_numbers(tiny_result: MemoryBenchmark) -> None:
    lines = format_memory_table(tiny_result).splitlines()
    setting = tiny_result.setting
    assert lines[0] == (
        f"vit_tiny_patch16_224, 64 px, batch 2, 3 classes, float16 cache; cpu ({setting.machine}), "
        f"torch {torch.__version__}"
    )
    recomputed = replace(tiny_result, setting=replace(setting, grad_checkpointing=True))
    assert ", float16 cache, side blocks recomputed in backward; cpu" in format_memory_table(recomputed)
    assert lines[2].startswith("| method | learnable params | r | measured peak (MiB) |")
    assert len(lines) == 4 + len(METHODS)  # no skipped meters, no notes
    full, linear = lines[4], lines[5]
    row = tiny_result.methods["full"]
    assert full == (
        f"| full | 250,627 | 100.00 % | {row.measured_peak_bytes / MiB:,.1f} | "
        f"{row.simulated_peak_bytes / MiB:,.1f} | 100.00 % | {row.step_seconds:.2f} |"
    )
    row = tiny_result.methods["linear"]
    assert linear.startswith(f"| linear | 387 | 0.15 % | {row.measured_peak_bytes / MiB:,.1f} |")
    assert f"| {100 * row.memory_ratio:.2f} % |" in linear


def test_full_fine_tuning_params_counts_the_whole_lpm_and_head_on_the_vit_b_geometry() -> None:
    # ViT-B/16 at 384 px: 768 wide, 12 blocks, 24 x 24 + 1 tokens; 86,094,341 with a 5-class head
    assert full_fine_tuning_params(BackboneSpec("vit_base_patch16_384"), 5, 512) == vit_params(768, 12, 16, 577, 5)
    assert vit_params(768, 12, 16, 577, 5) == 86_094_341


def test_param_ratio_on_the_vit_b_geometry_from_the_simulated_meter() -> None:
    backbone = BackboneSpec("vit_base_patch16_384")
    result = benchmark_memory(backbone, 512, 16, ["fpt+"], ["simulated"], progress=False)
    row = result.methods["fpt+"]
    assert result.setting.full_fine_tuning_params == 86_094_341
    assert row.param_ratio == row.learnable_params / 86_094_341
    assert 0.005 < row.param_ratio < 0.02  # about 1 % of full fine-tuning's parameters
    assert row.peak_meter == "simulated" and row.peak_bytes > row.baseline_bytes > 0


def test_free_memory_on_the_cpu_is_the_hosts_available_memory() -> None:
    free = free_memory_bytes(torch.device("cpu"))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert isinstance(free, int)
    assert 0 < free <= total


@pytest.fixture(scope="module")
def sweep() -> list[MemoryBenchmark]:
    """The simulated meter at 32 and 64 px for full, linear and fpt+ (3 classes)."""
    methods = ["full", "linear", "fpt+"]
    return [
        benchmark_memory(PATCH16, size, 2, methods, ["simulated"], num_classes=NUM_CLASSES, progress=False)
        for size in (32, 64)
    ]


def test_sweep_csv_has_one_row_per_input_size_and_method(
    tmp_path: Path, sweep: list[MemoryBenchmark], tiny_result: MemoryBenchmark
) -> None:
    path = write_sweep_csv([*sweep, tiny_result], tmp_path / "nested" / "sweep.csv")

    assert path == tmp_path / "nested" / "sweep.csv"
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["input_size", "method", "learnable_params", "measured_peak_bytes", "simulated_peak_bytes"]
    expected = [
        [
            str(result.setting.input_size),
            name,
            str(row.learnable_params),
            str(row.measured_peak_bytes or ""),
            str(row.simulated_peak_bytes),
        ]
        for result in [*sweep, tiny_result]
        for name, row in result.methods.items()
    ]
    assert rows[1:] == expected
    assert [row[:2] for row in rows[1:7]] == [[s, m] for s in ("32", "64") for m in ("full", "linear", "fpt+")]
    assert all(row[3] == "" for row in rows[1:7])  # simulated only: no measured peak
    assert all(row[3].isdigit() for row in rows[7:])
    # position embeddings are interpolated in the forward pass: learnable parameters do not depend on the input size
    assert rows[1][2] == rows[4][2] == str(TINY_FULL_PARAMS)
    # the activations grow with the input size
    assert int(rows[4][4]) > int(rows[1][4])


def test_plots_are_written_as_png_files(
    tmp_path: Path, sweep: list[MemoryBenchmark], tiny_result: MemoryBenchmark
) -> None:
    bars = plot_memory(tiny_result, tmp_path / "plots" / "memory.png")
    lines = plot_sweep(sweep, tmp_path / "plots" / "sweep.png")

    assert bars == tmp_path / "plots" / "memory.png" and is_png(bars)
    assert lines == tmp_path / "plots" / "sweep.png" and is_png(lines)


def test_bar_plot_leaves_out_methods_without_a_peak(tmp_path: Path, tiny_result: MemoryBenchmark) -> None:
    result = copy.deepcopy(tiny_result)
    result.methods["lora"].peak_bytes = None

    assert is_png(plot_memory(result, tmp_path / "memory.png"))


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["bench", "memory", *args]) == 0
    return capsys.readouterr().out


def test_cli_json_prints_one_object_of_setting_and_methods(
    capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path
) -> None:
    out = run_cli(
        capsys,
        *("--backbone", str(tiny_lpm_dir), "--input-size", "64", "--batch-size", "2", "--methods", "linear,fpt+"),
        "--json",
    )

    result = json.loads(out)
    assert set(result) == {"setting", "methods"}
    setting = result["setting"]
    assert setting["backbone"]["name"] == str(tiny_lpm_dir.resolve())
    assert [setting[key] for key in ("input_size", "batch_size", "num_classes", "device")] == [64, 2, 5, "cpu"]
    assert setting["full_fine_tuning_params"] == vit_params(64, 4, 16, 17, 5)
    assert list(result["methods"]) == ["linear", "fpt+"]
    backbone = BackboneSpec(str(tiny_lpm_dir))
    for name, row in result["methods"].items():
        assert isinstance(row["peak_bytes"], int) and row["peak_bytes"] > 0
        assert row["peak_meter"] == "measured"
        assert row["learnable_params"] == training_step(name, backbone, 64, 2, 5).learnable_params
        assert row["memory_ratio"] is None  # full fine-tuning was not asked for
    assert result["methods"]["linear"]["learnable_params"] == 2 * 64 * 5 + 5


def test_cli_table_lists_the_methods(capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path) -> None:
    out = run_cli(
        capsys, "--backbone", str(tiny_lpm_dir), "--input-size", "64", "--batch-size", "2", "--methods", "full,linear"
    )

    lines = out.splitlines()
    assert lines[0].startswith(f"{tiny_lpm_dir.resolve()}, 64 px, batch 2, 5 classes, float16 cache; cpu (")
    full = vit_params(64, 4, 16, 17, 5)  # a 5-class head by default
    assert lines[4].startswith(f"| full | {full:,} | 100.00 % | ")
    assert lines[5].startswith(f"| linear | 645 | {100 * 645 / full:.2f} % | ")
    assert not any(line.startswith("wrote ") for line in lines)


def test_cli_sweep_writes_the_csv_and_the_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path
) -> None:
    out = run_cli(
        capsys,
        *("--backbone", str(tiny_lpm_dir), "--sweep-input-size", "32,64", "--meters", "simulated"),
        *("--batch-size", "2", "--methods", "full,fpt+", "--out", str(tmp_path)),
    )

    assert "input size 32 px" in out and "input size 64 px" in out
    assert f"wrote {tmp_path / 'memory_sweep.csv'}" in out
    assert f"wrote {tmp_path / 'memory_sweep.png'}" in out
    with (tmp_path / "memory_sweep.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["input_size"], row["method"]) for row in rows] == [
        ("32", "full"),
        ("32", "fpt+"),
        ("64", "full"),
        ("64", "fpt+"),
    ]
    assert all(row["measured_peak_bytes"] == "" and int(row["simulated_peak_bytes"]) > 0 for row in rows)
    assert is_png(tmp_path / "memory_sweep.png")


def test_cli_sweep_json_holds_one_result_per_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path
) -> None:
    out = run_cli(
        capsys,
        *("--backbone", str(tiny_lpm_dir), "--sweep-input-size", "32,64", "--meters", "simulated"),
        *("--methods", "linear", "--out", str(tmp_path), "--json"),
    )

    sweep = json.loads(out)["sweep"]
    assert [result["setting"]["input_size"] for result in sweep] == [32, 64]
    assert all(result["methods"]["linear"]["peak_meter"] == "simulated" for result in sweep)
    assert (tmp_path / "memory_sweep.csv").is_file()


def test_cli_plot_writes_the_bar_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path) -> None:
    options = ["--backbone", str(tiny_lpm_dir), "--input-size", "64", "--meters", "simulated", "--methods", "linear"]

    out = run_cli(capsys, *options, "--plot", "--out", str(tmp_path / "default"))
    assert f"wrote {tmp_path / 'default' / 'memory.png'}" in out
    assert is_png(tmp_path / "default" / "memory.png")

    run_cli(capsys, *options, "--plot", "bars.png", "--out", str(tmp_path / "named"))
    assert is_png(tmp_path / "named" / "bars.png")

    run_cli(capsys, *options[:2], "--sweep-input-size", "32,64", *options[4:], "--plot", "--out", str(tmp_path / "sw"))
    assert is_png(tmp_path / "sw" / "memory_32px.png") and is_png(tmp_path / "sw" / "memory_64px.png")


def test_cli_demo_backbone_is_the_shipped_lpm(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(
        capsys,
        *("--backbone", "demo", "--input-size", "64", "--batch-size", "1", "--meters", "simulated"),
        *("--methods", "linear", "--json"),
    )

    result = json.loads(out)
    assert result["setting"]["backbone"]["name"] == "fpt:demo"
    # the demo LPM is a ViT-Tiny (192 wide, 12 blocks) with 256 px position embeddings (16 x 16 + 1 tokens)
    assert result["setting"]["full_fine_tuning_params"] == vit_params(192, 12, 16, 257, 5)
    assert result["methods"]["linear"]["learnable_params"] == 2 * 192 * 5 + 5


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--methods", "nope", "unknown method(s) nope"), ("--meters", "nope", "meters must be among measured")],
)
def test_cli_refuses_unknown_methods_and_meters_with_usage_error(
    capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "memory", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fpt bench memory")
    assert message in err


def test_measured_meter_runs_where_free_memory_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_benchmark, "free_memory_bytes", lambda device: None)  # e.g. Windows
    row = benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, ["linear"], progress=False).methods["linear"]
    assert row.peak_meter == "measured" and row.note is None


def test_measured_meter_refuses_devices_whose_memory_it_cannot_read() -> None:
    with pytest.raises(FPTError, match="reads CPU or CUDA memory, not meta"):
        benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, ["linear"], device="meta", progress=False)


def test_cache_dtype_sizes_fpts_cached_batch(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bench", "memory", "--input-size", str(INPUT_SIZE), "--batch-size", str(BATCH_SIZE), "--json"]
    base += ["--methods", "fpt+", "--meters", "simulated"]
    results = {}
    for dtype in ("float16", "float32"):
        assert main([*base, "--cache-dtype", dtype]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert results["float16"]["setting"]["cache_dtype"] == "float16"
    half, full = (results[d]["methods"]["fpt+"]["baseline_bytes"] for d in ("float16", "float32"))
    geometry = training_step("fpt+", BackboneSpec("vit_base_patch16_384"), INPUT_SIZE, BATCH_SIZE).inputs[1]
    assert full - half == 2 * geometry.numel() * 2  # keys and values, 4 instead of 2 bytes per element


def test_cache_dtype_must_be_a_cache_dtype() -> None:
    with pytest.raises(FPTError, match=r"cache_dtype must be one of float32, bfloat16, float16, int8"):
        benchmark_memory(PATCH16, INPUT_SIZE, BATCH_SIZE, ["fpt+"], ["simulated"], cache_dtype=False)
