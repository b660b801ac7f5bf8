"""Every user error the reliability study met as a traceback is one `fpt: error:` line naming the file or option
and the fix."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import fpt.train
from fpt.cli import main
from fpt.errors import FPTError
from fpt.task import prepare
from tests.pipeline_fixtures import (
    cli_model_args,
    cli_run_args,
    fast_training,
    one_line_error,
    preload_into,
    read_json,
    tiny_config,
)

pytest_plugins = ("tests.pipeline_fixtures",)


def error_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 1
    return one_line_error(capsys)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--size", "10"), "synthetic images need at least 32 px"),
        (("--train", "-3"), "image counts must not be negative"),
    ],
)
def test_synth_refuses_sizes_and_counts_it_cannot_draw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    assert expected in error_of(capsys, "synth", str(tmp_path / "out"), *args)
    assert not (tmp_path / "out").exists()


def test_bench_memory_refuses_a_batch_of_zero(capsys: pytest.CaptureFixture[str]) -> None:
    options = ("--backbone", "demo", "--input-size", "64", "--meters", "simulated", "--methods", "linear")
    assert "the batch size and the number of classes must be positive" in error_of(
        capsys, "bench", "memory", *options, "--batch-size", "0"
    )


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_learning_rate_that_is_not_a_number_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path, tiny_lpm_dir: Path, value: str
) -> None:
    args = ["train", str(image_data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]
    error = error_of(capsys, *args, "--run", str(tmp_path / "run"), "--lr", value)
    assert "learning rate, weight decay, warm-up, fusion lr scale and label smoothing must be numbers" in error


@pytest.mark.parametrize("content", [b"\xff\xfe not json", b'{"format": 2}', b'{"format": 2, "fingerprint": 3}'])
def test_a_damaged_manifest_is_one_line_with_the_rebuild_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained_run: Path, content: bytes
) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(trained_run, run)
    record = read_json(run / "run.json")
    shutil.copytree(record["training"]["cache_dir"], cache)
    record["training"]["cache_dir"] = str(cache)
    (run / "run.json").write_text(json.dumps(record))
    (cache / "manifest.json").write_bytes(content)

    error = error_of(capsys, "evaluate", str(run))
    assert f"{cache / 'manifest.json'} is damaged (not a cache manifest)" in error and "--overwrite" in error


def test_predict_refuses_a_csv_in_a_missing_folder_before_predicting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trained_run: Path, image_data: Path
) -> None:
    image = next(image_data.rglob("*.png"))
    csv = tmp_path / "missing" / "out.csv"
    error = error_of(capsys, "predict", str(trained_run), str(image), "--csv", str(csv))
    assert f"--csv {csv}: its folder does not exist" in error


def test_weights_of_another_architecture_name_the_mismatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path
) -> None:
    small = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    args = ["train", str(image_data), "--backbone", "vit_tiny_patch16_224"]
    args += ["--backbone-weights", str(tmp_path / "small.safetensors"), "--input-size", "64"]
    error = error_of(capsys, *args, *cli_run_args(tmp_path / "cache"), "--run", str(tmp_path / "run"))
    assert "small.safetensors (width 384, 12 blocks, patch 16) do not fit" in error
    assert "the architecture vit_tiny_patch16_224" in error
    assert "(width 192, 12 blocks, patch 16)" in error
    assert "pass the architecture they were trained with as --backbone" in error


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this must never run",))


def test_pickled_weights_are_refused_without_advising_to_unpickle_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path
) -> None:
    torch.save({"payload": _Payload()}, tmp_path / "pickled.pth")
    args = ["train", str(image_data), "--backbone", "vit_tiny_patch16_224"]
    args += ["--backbone-weights", str(tmp_path / "pickled.pth"), "--input-size", "64"]
    error = error_of(capsys, *args, *cli_run_args(tmp_path / "cache"), "--run", str(tmp_path / "run"))
    assert "holds pickled Python objects besides tensors, which fpt never unpickles" in error
    assert "weights_only=False" not in error and "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EROFS, "the filesystem is read-only; pass a writable folder"),
        (errno.ENOSPC, "free space and rerun (finished work is kept)"),
        (errno.EACCES, "fix its permissions or pass another folder"),
    ],
)
def test_a_filesystem_that_refuses_a_write_in_the_run_is_one_line_naming_the_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    image_data: Path,
    tiny_lpm_dir: Path,
    code: int,
    advice: str,
) -> None:
    report = tmp_path / "run" / "report.html"

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(code, "refused", str(report))

    monkeypatch.setattr(fpt.train, "write_report", refused)
    args = ["train", str(image_data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]
    error = error_of(capsys, *args, "--run", str(tmp_path / "run"), "--epochs", "1")
    assert error == f"fpt: error: {report}: refused; {advice}"


def test_features_that_are_not_finite_are_refused_naming_the_images(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    dataset, model, normalization = prepare(image_data, tiny_config(tiny_lpm_dir), fast_training(None), False)
    with torch.no_grad():
        model.frozen_lpm().patch_embed.proj.bias.fill_(math.inf)
    with pytest.raises(FPTError, match=r"features of .*png.* are not finite in float16 .*--cache-dtype float32"):
        preload_into(model, dataset, tmp_path / "cache", normalization)
