"""torchrun with 2 CPU processes (gloo). Preloading: the same cache as one process, resumable after kill -9 of one
rank or of the whole job, completed by a rerun with another number of ranks. Training: the same run as one process
(to float rounding), and a run resumed under torchrun."""

from __future__ import annotations

import csv
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fpt.cache import FRAGMENT_GLOB, LOCK_NAME, FeatureCache
from fpt.cli import main
from fpt.distributed import Ranks, refuse_under_torchrun
from fpt.errors import FPTError
from tests.pipeline_fixtures import (
    CLASSES,
    NUM_IMAGES,
    SPLIT_SIZES,
    cli_model_args,
    interrupt_at_epoch,
    metric_lines,
    read_json,
)

pytest_plugins = ("tests.pipeline_fixtures",)
NUM_TEST = len(CLASSES) * SPLIT_SIZES["test"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds and kills ranks through /proc"),
]


def preload_args(data: Path, lpm_dir: Path, cache: Path, batch_size: int = 3) -> list[str]:
    options = ["--cache", str(cache), "--cache-dtype", "float32", "--batch-size", str(batch_size)]
    return ["preload", str(data), *cli_model_args(lpm_dir), *options, "--workers", "0", "--device", "cpu"]


def torchrun(nproc: int, args: list[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node NPROC -m fpt ARGS`` (the module form of torchrun)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fpt",
        *args,
    ]


def assert_same_cache(found: Path, expected: Path) -> None:
    """Same fingerprint, keys, content hashes and record bytes (shard names and slots may differ)."""
    got, want = FeatureCache.open(found), FeatureCache.open(expected)
    assert got.fingerprint == want.fingerprint
    assert sorted(got.entries) == sorted(want.entries)
    for key, entry in want.entries.items():
        assert (got.entries[key].sha256, got.entries[key].crc32) == (entry.sha256, entry.crc32), key
        for name, part in want.get(key).items():
            assert torch.equal(got.get(key)[name], part), f"{key} {name}"
    assert not list(found.glob(FRAGMENT_GLOB)), "rank 0 merges and removes every index fragment"


@pytest.fixture(scope="module")
def slow_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 large noisy JPEGs in two classes (each takes a while to decode, so a rank can be killed mid-preload)."""
    root = tmp_path_factory.mktemp("slow_images")
    rng = np.random.default_rng(0)
    for split, count in {"train": 8, "val": 2, "test": 2}.items():
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, size=(1400, 1400, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"img{index:03d}.jpg", quality=95)
    return root


def test_two_ranks_preload_the_cache_one_process_does(tmp_path: Path, image_data: Path, tiny_lpm_dir: Path) -> None:
    assert main(preload_args(image_data, tiny_lpm_dir, tmp_path / "single")) == 0

    job = subprocess.run(
        torchrun(2, preload_args(image_data, tiny_lpm_dir, tmp_path / "two")), capture_output=True, text=True
    )

    assert job.returncode == 0, job.stderr[-2000:]
    assert f"{NUM_IMAGES} images computed, 0 already cached" in job.stdout
    assert job.stdout.count("images computed") == 1  # rank 0 reports for the job
    assert_same_cache(tmp_path / "two", tmp_path / "single")
    assert {path.name for path in (tmp_path / "two").glob("shard-*.bin")} == {"shard-00000.bin", "shard-r1-00000.bin"}

    rerun = subprocess.run(
        torchrun(2, preload_args(image_data, tiny_lpm_dir, tmp_path / "two")), capture_output=True, text=True
    )
    assert rerun.returncode == 0 and f"0 images computed, {NUM_IMAGES} already cached" in rerun.stdout


def rank_pids(job: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of each worker torchrun started (its children whose environment has RANK)."""
    found = {}
    children = Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()
    for pid in children:
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for variable in environment:
            if variable.startswith(b"RANK="):
                found[int(variable.removeprefix(b"RANK="))] = int(pid)
    return found


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def kill_once_rank_1_has_written(job: subprocess.Popen, cache: Path, whole_job: bool) -> int:
    """Kill -9 rank 1 (or every process of the job) as soon as rank 1 has indexed its first record; returns how
    many records rank 1 had indexed by then."""
    fragment = cache / "index-r1.jsonl"
    deadline = time.monotonic() + 240
    while lines(fragment) == 0:
        assert job.poll() is None, "the job ended before rank 1 wrote anything"
        assert time.monotonic() < deadline, "rank 1 wrote nothing in 4 minutes"
        time.sleep(0.005)
    workers = rank_pids(job)
    for pid in [*workers.values(), job.pid] if whole_job else [workers[1]]:
        os.kill(pid, signal.SIGKILL)
    written = lines(fragment)
    job.wait(timeout=120)
    return written


@pytest.mark.parametrize("whole_job", [False, True], ids=["rank-1-killed", "whole-job-killed"])
def test_a_killed_preload_is_completed_by_a_rerun_with_another_number_of_ranks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], slow_images: Path, tiny_lpm_dir: Path, whole_job: bool
) -> None:
    assert main(preload_args(slow_images, tiny_lpm_dir, tmp_path / "single", batch_size=1)) == 0
    cache = tmp_path / "killed"
    job = subprocess.Popen(
        torchrun(2, preload_args(slow_images, tiny_lpm_dir, cache, batch_size=1)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    written = kill_once_rank_1_has_written(job, cache, whole_job)
    assert job.returncode != 0
    assert 0 < written < 12, "rank 1 was killed with part of its 12 images done"

    if whole_job:  # three ranks merge what the two left and compute the rest
        completed = subprocess.run(
            torchrun(3, preload_args(slow_images, tiny_lpm_dir, cache)), capture_output=True, text=True
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        report = completed.stdout
    else:  # one process does
        capsys.readouterr()
        assert main(preload_args(slow_images, tiny_lpm_dir, cache)) == 0
        report = capsys.readouterr().out
    computed = int(report.split(" images computed")[0].split()[-1])
    assert 0 < computed < 24, "what was indexed before the kill is not computed again"
    assert_same_cache(cache, tmp_path / "single")


def train_args(
    data: Path, lpm_dir: Path, cache: Path, run: Path, method: str = "fpt+", batch_size: int = 5
) -> list[str]:
    """Three epochs of 12 training images (in batches of 5 the last batch, 2 images, is split 1/1 on 2 ranks; in
    batches of 11 the last, 1 image, leaves rank 0 without a share), the training views augmented."""
    model = cli_model_args(lpm_dir) if method == "fpt+" else ["--backbone", str(lpm_dir), "--method", method]
    options = ["--epochs", "3", "--batch-size", str(batch_size), "--lr", "3e-3", "--seed", "0", "--input-size", "64"]
    return ["train", str(data), *model, *options, "--cache", str(cache), "--run-dir", str(run), "--workers", "0"]


def assert_runs_agree(got: Path, want: Path, tolerance: float) -> None:
    """Every number of metrics.jsonl (but the timings), of results.json and of the test predictions agrees within
    ``tolerance`` (relative and absolute), and the weights within ``WEIGHT_TOLERANCE``; the files are the same
    ones."""
    got_lines, want_lines = metric_lines(got), metric_lines(want)
    assert [sorted(line) for line in got_lines] == [sorted(line) for line in want_lines]
    for got_line, want_line in zip(got_lines, want_lines, strict=True):
        for name, value in want_line.items():
            assert got_line[name] == pytest.approx(value, rel=tolerance, abs=tolerance), (got_line["epoch"], name)
    got_results, want_results = read_json(got / "results.json"), read_json(want / "results.json")
    assert got_results["best_epoch"] == want_results["best_epoch"]
    for checkpoint in ("best", "last"):
        for name, value in want_results[checkpoint].items():
            if isinstance(value, float):
                assert got_results[checkpoint][name] == pytest.approx(value, rel=tolerance, abs=tolerance), name
            else:
                assert got_results[checkpoint][name] == value, name
        got_weights = load_file(got / "checkpoints" / checkpoint / "model.safetensors")
        want_weights = load_file(want / "checkpoints" / checkpoint / "model.safetensors")
        assert set(got_weights) == set(want_weights)
        for key, tensor in want_weights.items():
            torch.testing.assert_close(got_weights[key], tensor, rtol=0, atol=WEIGHT_TOLERANCE)
        got_rows, want_rows = (
            list(csv.reader((run / "predictions" / f"test_{checkpoint}.csv").open())) for run in (got, want)
        )
        assert len(want_rows) == NUM_TEST + 1 and [row[:2] for row in got_rows] == [row[:2] for row in want_rows]
        for got_row, want_row in zip(got_rows[1:], want_rows[1:], strict=True):
            assert [float(p) for p in got_row[2:]] == pytest.approx([float(p) for p in want_row[2:]], abs=tolerance)
    assert sorted(path.name for path in got.iterdir()) == sorted(path.name for path in want.iterdir())


# Two processes sum each step's gradients in another order than one process does, so the runs agree to float32
# rounding, not bit for bit: their metrics and predictions within 1e-5. Weights whose true gradient is zero (the
# side attention's key bias: softmax ignores a shift shared by every key) get rounding noise for a gradient, which
# Adam's normalisation turns into steps of up to the learning rate in either run; they change no output, so the
# weights are held to a fraction of the learning rate (3e-3 here).
TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-3


@pytest.mark.parametrize(
    ("method", "batch_size"),
    [("fpt+", 5), ("linear", 11), ("lora", 11)],
    ids=["fpt+-last-batch-split", "linear-probe-one-rank-without-share", "lora-one-rank-without-share"],
)
def test_two_ranks_train_the_run_one_process_trains(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, method: str, batch_size: int
) -> None:
    cache = tmp_path / "cache"
    args = {"method": method, "batch_size": batch_size}
    assert main([*train_args(image_data, tiny_lpm_dir, cache, tmp_path / "one", **args), "--device", "cpu"]) == 0

    job = subprocess.run(
        torchrun(2, [*train_args(image_data, tiny_lpm_dir, cache, tmp_path / "two", **args), "--device", "cpu"]),
        capture_output=True,
        text=True,
    )

    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stdout.count("run written to") == 1  # rank 0 reports for the job
    assert_runs_agree(tmp_path / "two", tmp_path / "one", TOLERANCE)


def test_a_run_interrupted_in_one_process_resumes_under_torchrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_data: Path, tiny_lpm_dir: Path
) -> None:
    cache = tmp_path / "cache"
    assert main([*train_args(image_data, tiny_lpm_dir, cache, tmp_path / "reference"), "--device", "cpu"]) == 0
    interrupt_at_epoch(monkeypatch, 2)
    assert main([*train_args(image_data, tiny_lpm_dir, cache, tmp_path / "run"), "--device", "cpu"]) != 0  # Ctrl-C
    monkeypatch.undo()
    assert not (tmp_path / "run" / "results.json").exists()

    job = subprocess.run(
        torchrun(2, ["train", "--resume", str(tmp_path / "run"), "--device", "cpu"]), capture_output=True, text=True
    )

    assert job.returncode == 0, job.stderr[-3000:]
    assert_runs_agree(tmp_path / "run", tmp_path / "reference", TOLERANCE)


def test_more_ranks_than_a_batch_holds_are_refused_in_one_line(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    args = [*train_args(image_data, tiny_lpm_dir, tmp_path / "cache", tmp_path / "run"), "--batch-size", "1"]
    job = subprocess.run(torchrun(2, [*args, "--device", "cpu"]), capture_output=True, text=True)

    assert job.returncode != 0
    message = "fpt: error: 2 processes share each batch, but the batch size is 1 and the training split has 12 images"
    assert job.stderr.count(message) == 2  # each rank, no hang


def test_a_distributed_preload_refuses_a_cache_another_process_is_writing(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    (tmp_path / "cache").mkdir()
    with (tmp_path / "cache" / LOCK_NAME).open("ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a preload in progress holds it
        job = subprocess.run(
            torchrun(2, preload_args(image_data, tiny_lpm_dir, tmp_path / "cache")),
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert job.returncode != 0
    assert job.stderr.count("fpt: error: another preload is writing the feature cache") == 2  # each rank, no hang


def test_a_fixed_gpu_under_torchrun_is_refused_in_one_line() -> None:
    with pytest.raises(FPTError, match="each process takes its own GPU; pass --device cuda, not cuda:1"):
        Ranks(rank=0, world_size=2, local_rank=0).device_name("cuda:1")
    assert Ranks().device_name("cuda:1") == "cuda:1"  # one process: used as given


def test_commands_that_train_several_runs_are_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FPTError, match=r"`fpt demo` runs in one process .* start it without torchrun"):
        refuse_under_torchrun("`fpt demo`")
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_under_torchrun("`fpt demo`")
