"""The feature cache: what `preload` stores, its fingerprint, resuming after interruptions, disk full, misses."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import fpt.cache
from fpt.cache import (
    CACHE_DTYPES,
    FRAGMENT_GLOB,
    INDEX_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    CacheWriter,
    FeatureCache,
    content_digest,
)
from fpt.config import BackboneSpec, LinearProbeConfig
from fpt.data.datasets import ImageDataset
from fpt.data.transforms import Normalization
from fpt.errors import FPTError
from fpt.models.fpt import FPTModel
from fpt.preload import InOrderWrites, PreloadSummary, preload_together, weights_digest
from fpt.task import prepare
from tests.conftest import randomize_
from tests.pipeline_fixtures import (
    NUM_IMAGES,
    all_keys,
    assert_features_equal,
    fast_training,
    preload_into,
    reference_features,
    tiny_config,
    write_image_folder,
)

pytest_plugins = ("tests.pipeline_fixtures",)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Setup:
    dataset: ImageDataset
    model: FPTModel
    normalization: Normalization


def make_setup(data: Path, lpm_dir: Path, **config_overrides: Any) -> Setup:
    return Setup(*prepare(data, tiny_config(lpm_dir, **config_overrides), fast_training(None), progress=False))


def run_preload(setup: Setup, cache_dir: Path, **options: Any) -> PreloadSummary:
    options = {"batch_size": 8, "num_workers": 0, "device": "cpu", "progress": False, **options}
    return preload_into(setup.model, setup.dataset, cache_dir, setup.normalization, **options)


def assert_cache_complete_and_correct(cache_dir: Path, setup: Setup, dtype: torch.dtype = torch.float16) -> None:
    cache = FeatureCache.open(cache_dir)
    assert sorted(cache.entries) == sorted(all_keys(setup.dataset))
    for key, expected in reference_features(setup.model, setup.dataset, setup.normalization).items():
        assert_features_equal(cache.get(key), expected, dtype)


@pytest.fixture
def setup(image_data: Path, tiny_lpm_dir: Path) -> Setup:
    return make_setup(image_data, tiny_lpm_dir)


def test_preload_caches_every_image_keyed_by_its_path_relative_to_the_data_root(tmp_path: Path, setup: Setup) -> None:
    summary = run_preload(setup, tmp_path / "cache")

    assert (summary.computed, summary.reused) == (NUM_IMAGES, 0)
    cache = FeatureCache.open(tmp_path / "cache")
    assert len(cache) == NUM_IMAGES
    assert sorted(cache.entries) == sorted(all_keys(setup.dataset))
    assert "train/a/img001.png" in cache
    assert "train/b/img001.png" in cache
    assert not any(key.startswith("/") or str(setup.dataset.root) in key for key in cache.entries)


def test_same_file_name_in_two_class_folders_gives_two_entries_each_with_its_own_features(
    tmp_path: Path, setup: Setup
) -> None:
    run_preload(setup, tmp_path / "cache")
    cache = FeatureCache.open(tmp_path / "cache")
    references = reference_features(setup.model, setup.dataset, setup.normalization)

    first, second = cache.get("train/a/img001.png"), cache.get("train/b/img001.png")

    assert not torch.equal(first["keys"], second["keys"])
    assert not torch.equal(first["values"], second["values"])
    assert_features_equal(first, references["train/a/img001.png"], torch.float16)
    assert_features_equal(second, references["train/b/img001.png"], torch.float16)


@pytest.mark.parametrize("dtype", [name for name in CACHE_DTYPES if name != "int8"])  # int8: test_int8_cache.py
def test_cached_features_equal_the_encoder_output_of_the_lpm_view(tmp_path: Path, setup: Setup, dtype: str) -> None:
    # batch size 1, so the encoder sees exactly what the one-image reference computation sees (float32 is exact)
    run_preload(setup, tmp_path / "cache", dtype=dtype, batch_size=1)

    cache = FeatureCache.open(tmp_path / "cache")
    # FPT+ on the tiny LPM: layers 2 and 3, 4 heads, int(17 * 0.3) = 5 tokens, 64 / 4 = 16 dims per head
    assert cache.layout.parts == {"keys": (2, 4, 5, 16), "values": (2, 4, 5, 16)}
    assert cache.layout.dtype == dtype
    assert_cache_complete_and_correct(tmp_path / "cache", setup, CACHE_DTYPES[dtype])


def test_batched_preload_stores_the_same_features_as_one_image_at_a_time(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "batched", dtype="float32", batch_size=7)
    run_preload(setup, tmp_path / "single", dtype="float32", batch_size=1)

    batched, single = FeatureCache.open(tmp_path / "batched"), FeatureCache.open(tmp_path / "single")
    for key in all_keys(setup.dataset):
        torch.testing.assert_close(batched.get(key), single.get(key), rtol=1e-5, atol=1e-5)


def test_rerun_computes_nothing_when_everything_is_cached(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache")
    before = {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()}

    summary = run_preload(setup, tmp_path / "cache")

    assert (summary.computed, summary.reused) == (0, NUM_IMAGES)
    assert {path.name: path.read_bytes() for path in (tmp_path / "cache").iterdir()} == before


def test_manifest_fingerprints_everything_that_determines_the_features(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache", dtype="bfloat16")

    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    fingerprint = manifest["fingerprint"]
    assert fingerprint["backbone"] == setup.model.config.backbone.to_dict()
    assert fingerprint["weights_sha256"] == weights_digest(setup.model.encoder.model)
    assert fingerprint["lpm_input_size"] == 64
    assert fingerprint["tapped_layers"] == [2, 3]
    assert fingerprint["token_ratio"] == 0.3
    assert fingerprint["importance"] == "global"
    assert fingerprint["normalization"] == {
        "mean": list(setup.normalization.mean),
        "std": list(setup.normalization.std),
    }
    assert fingerprint["dtype"] == "bfloat16"
    assert fingerprint["fpt_version"] == fpt.__version__
    assert manifest["layout"] == {"parts": {"keys": [2, 4, 5, 16], "values": [2, 4, 5, 16]}, "dtype": "bfloat16"}


def _other_token_ratio(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return make_setup(data, lpm_dir, token_ratio=0.5), {}


def _other_input_size(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return make_setup(data, lpm_dir, lpm_input_size=48), {}


def _other_layers(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return make_setup(data, lpm_dir, tapped_layers=[1, 3]), {}


def _other_importance(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return make_setup(data, lpm_dir, importance="cls"), {}


def _other_weights(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    randomize_(setup.model.encoder.model, seed=7)  # same spec, different weights
    return setup, {}


def _other_normalization(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return Setup(setup.dataset, setup.model, Normalization((0.4, 0.4, 0.4), (0.2, 0.2, 0.2))), {}


def _other_dtype(setup: Setup, data: Path, lpm_dir: Path) -> tuple[Setup, dict[str, Any]]:
    return setup, {"dtype": "float32"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_other_token_ratio, "token_ratio"),
        (_other_input_size, "lpm_input_size"),
        (_other_layers, "tapped_layers"),
        (_other_importance, "importance"),
        (_other_weights, "weights_sha256"),
        (_other_normalization, "normalization"),
        (_other_dtype, "dtype"),
    ],
)
def test_cache_built_with_other_settings_is_refused_saying_what_differs_and_how_to_rebuild(
    tmp_path: Path,
    setup: Setup,
    image_data: Path,
    tiny_lpm_dir: Path,
    change,
    field: str,
) -> None:
    run_preload(setup, tmp_path / "cache")
    other, options = change(setup, image_data, tiny_lpm_dir)

    with pytest.raises(FPTError) as error:
        run_preload(other, tmp_path / "cache", **options)

    message = str(error.value)
    assert f"{field}: cache has" in message
    assert "--overwrite" in message
    assert str(tmp_path / "cache") in message
    assert len(FeatureCache.open(tmp_path / "cache")) == NUM_IMAGES  # refused, so untouched


def test_open_with_another_fingerprint_is_refused(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache")
    fingerprint = dict(FeatureCache.open(tmp_path / "cache").fingerprint, token_ratio=0.9)

    with pytest.raises(FPTError, match=r"token_ratio: cache has 0\.3, this run needs 0\.9"):
        FeatureCache.open(tmp_path / "cache", fingerprint)


def test_index_fragments_an_interrupted_distributed_preload_left_are_merged_by_the_next_preload(
    tmp_path: Path, setup: Setup
) -> None:
    run_preload(setup, tmp_path / "cache")
    index = tmp_path / "cache" / INDEX_NAME
    lines = index.read_bytes().splitlines(keepends=True)
    half = len(lines) // 2
    index.write_bytes(b"".join(lines[:half]))  # as if rank 1 had indexed the rest in its fragment, then died
    (tmp_path / "cache" / "index-r1.jsonl").write_bytes(b"".join(lines[half:]) + b'{"key": "unfinished')
    assert len(FeatureCache.open(tmp_path / "cache")) == half  # readers see only what is merged

    summary = run_preload(setup, tmp_path / "cache")

    assert (summary.computed, summary.reused) == (0, NUM_IMAGES)
    assert not list((tmp_path / "cache").glob(FRAGMENT_GLOB))
    assert_cache_complete_and_correct(tmp_path / "cache", setup)


def test_overwrite_removes_index_fragments_and_rank_shards(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache")
    (tmp_path / "cache" / "index-r1.jsonl").write_bytes((tmp_path / "cache" / INDEX_NAME).read_bytes())
    (tmp_path / "cache" / "shard-r1-00000.bin").write_bytes(b"\0" * 64)

    summary = run_preload(setup, tmp_path / "cache", overwrite=True)

    assert summary.computed == NUM_IMAGES
    assert sorted(path.name for path in (tmp_path / "cache").iterdir() if path.name != LOCK_NAME) == [
        INDEX_NAME,
        MANIFEST_NAME,
        "shard-00000.bin",
    ]


def test_overwrite_rebuilds_a_cache_built_with_other_settings(
    tmp_path: Path,
    setup: Setup,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    run_preload(setup, tmp_path / "cache")
    other = make_setup(image_data, tiny_lpm_dir, token_ratio=0.5)

    summary = run_preload(other, tmp_path / "cache", overwrite=True, dtype="float32")

    assert (summary.computed, summary.reused) == (NUM_IMAGES, 0)
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.fingerprint["token_ratio"] == 0.5
    assert cache.layout.parts["keys"] == (2, 4, 8, 16)  # int(17 * 0.5) = 8 tokens
    assert len(list((tmp_path / "cache").glob("shard-*.bin"))) == 1  # the old shards are gone
    assert_cache_complete_and_correct(tmp_path / "cache", other, torch.float32)


def test_interrupted_preload_resumes_computing_only_the_missing_images(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    original_add = CacheWriter.add
    calls = []

    def interrupted_add(self, keys, parts, digests):
        calls.append(len(keys))
        if len(calls) == 2:
            raise KeyboardInterrupt
        original_add(self, keys, parts, digests)

    monkeypatch.setattr(CacheWriter, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        run_preload(setup, tmp_path / "cache", batch_size=8)
    monkeypatch.undo()
    assert len(FeatureCache.open(tmp_path / "cache")) == 8

    encoded = []
    encoder_forward = type(setup.model.encoder).forward

    def counting_forward(self, images):
        encoded.append(images.shape[0])
        return encoder_forward(self, images)

    monkeypatch.setattr(type(setup.model.encoder), "forward", counting_forward)
    summary = run_preload(setup, tmp_path / "cache", batch_size=8)
    monkeypatch.undo()

    assert (summary.computed, summary.reused) == (NUM_IMAGES - 8, 8)
    assert sum(encoded) == NUM_IMAGES - 8
    assert_cache_complete_and_correct(tmp_path / "cache", setup)


def test_truncated_index_line_and_orphan_shard_bytes_are_ignored_and_the_rerun_completes(
    tmp_path: Path, setup: Setup
) -> None:
    cache_dir = tmp_path / "cache"
    run_preload(setup, cache_dir, batch_size=8)
    # keep the first 10 entries, as if killed after writing a record's data but only part of its index line
    index = cache_dir / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    with (cache_dir / "shard-00000.bin").open("ab") as shard:
        shard.write(os.urandom(1000))  # orphan bytes of a record that was never indexed
    (cache_dir / "shard-00001.bin").write_bytes(os.urandom(3000))  # a shard whose records were never indexed

    assert len(FeatureCache.open(cache_dir)) == 10
    summary = run_preload(setup, cache_dir, batch_size=8)

    assert (summary.computed, summary.reused) == (NUM_IMAGES - 10, 10)
    assert index.read_bytes().endswith(b"\n")
    assert all(json.loads(line)["key"] for line in index.read_text().splitlines())
    assert_cache_complete_and_correct(cache_dir, setup)


KILLED_PRELOAD = textwrap.dedent(
    """
    import sys, time
    from fpt.models.frozen_encoder import FrozenEncoder
    from fpt.task import prepare
    from tests.pipeline_fixtures import fast_training, preload_into, tiny_config

    data, lpm_dir, cache_dir = sys.argv[1:4]
    forward = FrozenEncoder.forward

    def slow_forward(self, images):
        time.sleep(0.25)
        return forward(self, images)

    FrozenEncoder.forward = slow_forward
    dataset, model, normalization = prepare(data, tiny_config(lpm_dir), fast_training(None), progress=False)
    preload_into(model, dataset, cache_dir, normalization, batch_size=1, num_workers=0, device="cpu", progress=False)
    """
)


@pytest.mark.slow
def test_preload_killed_with_sigkill_resumes_to_a_complete_and_correct_cache(
    tmp_path: Path,
    setup: Setup,
    image_data: Path,
    tiny_lpm_dir: Path,
) -> None:
    cache_dir = tmp_path / "cache"
    index = cache_dir / "index.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_PRELOAD, str(image_data), str(tiny_lpm_dir), str(cache_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (index.is_file() and index.read_bytes().count(b"\n") >= 1):
            if process.poll() is not None:
                pytest.fail(f"preload exited before caching anything: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "preload cached nothing within 60 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    process.stdout.close()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    done = len(FeatureCache.open(cache_dir))
    assert 1 <= done < NUM_IMAGES

    summary = run_preload(setup, cache_dir)

    assert (summary.computed, summary.reused) == (NUM_IMAGES - done, done)
    assert_cache_complete_and_correct(cache_dir, setup)


def test_summary_reports_the_size_on_disk_of_the_cache_directory(tmp_path: Path, setup: Setup) -> None:
    summary = run_preload(setup, tmp_path / "cache")

    files = [path for path in (tmp_path / "cache").iterdir() if path.is_file()]
    assert summary.bytes_on_disk == sum(path.stat().st_size for path in files) > 0
    assert summary.bytes_on_disk >= NUM_IMAGES * FeatureCache.open(tmp_path / "cache").layout.nbytes
    assert FeatureCache.open(tmp_path / "cache").size_on_disk() == summary.bytes_on_disk
    assert summary.cache_dir == tmp_path / "cache"
    assert summary.seconds >= 0


def test_cache_stores_records_in_a_few_shards_plus_an_index(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache", batch_size=8)

    names = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert names == ["cache.lock", "index.jsonl", "manifest.json", "shard-00000.bin"]
    layout = FeatureCache.open(tmp_path / "cache").layout
    assert layout.dtype == "float16"  # the default
    assert layout.nbytes == 2 * 2 * 4 * 5 * 16 * 2  # keys and values, float16
    assert (tmp_path / "cache" / "shard-00000.bin").stat().st_size == NUM_IMAGES * layout.nbytes


class _FillingFile:
    """A file on a disk that fills up after ``room`` bytes: that write lands partly and raises ENOSPC."""

    def __init__(self, handle, room: int) -> None:
        self._handle = handle
        self._room = room

    def write(self, data: bytes) -> int:
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def test_disk_full_while_caching_is_a_clear_error_and_keeps_the_entries_written_before(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    record_bytes = 2 * 2 * 4 * 5 * 16 * 2

    def open_on_a_small_disk(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by the cache writer)
        if Path(path).name.startswith("shard-"):
            return _FillingFile(handle, room=8 * record_bytes + 100)  # the first batch of 8 fits, the second not
        return handle

    monkeypatch.setattr(fpt.cache, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(FPTError) as error:
        run_preload(setup, cache_dir, batch_size=8)
    monkeypatch.undo()

    message = str(error.value)
    assert "disk full" in message
    assert str(cache_dir) in message
    assert "8 images cached so far are kept" in message
    assert "free space and rerun" in message
    cache = FeatureCache.open(cache_dir)
    assert len(cache) == 8
    references = reference_features(setup.model, setup.dataset, setup.normalization)
    for key in cache.entries:
        assert_features_equal(cache.get(key), references[key], torch.float16)

    summary = run_preload(setup, cache_dir, batch_size=8)

    assert (summary.computed, summary.reused) == (NUM_IMAGES - 8, 8)
    assert_cache_complete_and_correct(cache_dir, setup)


def test_other_write_errors_are_not_reported_as_disk_full(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fpt.cache.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as error:
        run_preload(setup, tmp_path / "cache")
    assert error.value.errno == errno.EIO
    assert not isinstance(error.value, FPTError)


def test_missing_entry_names_the_image_and_how_to_add_it(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache")
    cache = FeatureCache.open(tmp_path / "cache")

    with pytest.raises(FPTError) as error:
        cache.get("train/a/img999.png")

    message = str(error.value)
    assert "'train/a/img999.png'" in message
    assert str(tmp_path / "cache") in message
    assert "fpt preload" in message
    present = content_digest(setup.dataset.root / "train/a/img000.png")
    assert cache.missing({"train/a/img000.png": present, "train/a/img999.png": "0" * 64}) == ["train/a/img999.png"]


def test_opening_a_folder_without_a_cache_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match=r"no feature cache at .*build it with `fpt preload`"):
        FeatureCache.open(tmp_path)


def test_unknown_cache_dtype_is_refused(tmp_path: Path, setup: Setup) -> None:
    with pytest.raises(FPTError, match="cache dtype 'float64' is not one of float32, bfloat16, float16"):
        run_preload(setup, tmp_path / "cache", dtype="float64")
    assert not (tmp_path / "cache").exists()


def test_disk_full_when_writing_the_manifest_is_a_clear_error(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = fpt.cache._write_atomically

    def full_disk_write(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data)

    monkeypatch.setattr(fpt.cache, "_write_atomically", full_disk_write)
    with pytest.raises(FPTError, match="disk full"):
        run_preload(setup, tmp_path / "cache")


def test_images_changed_since_caching_are_recomputed(tmp_path: Path, tiny_lpm_dir: Path) -> None:
    first = write_image_folder(tmp_path / "a", seed=1)
    other = write_image_folder(tmp_path / "b", seed=2)  # the same relative paths, other pixels
    run_preload(make_setup(first, tiny_lpm_dir), tmp_path / "cache")

    setup = make_setup(other, tiny_lpm_dir)
    summary = run_preload(setup, tmp_path / "cache")

    assert (summary.computed, summary.reused) == (NUM_IMAGES, 0)
    assert_cache_complete_and_correct(tmp_path / "cache", setup)


def test_a_second_writer_waits_for_the_first(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache")
    cache = FeatureCache.open(tmp_path / "cache")
    entered = threading.Event()

    def second_writer() -> None:
        with FeatureCache.open(tmp_path / "cache").writer():
            entered.set()

    with cache.writer():
        thread = threading.Thread(target=second_writer)
        thread.start()
        assert not entered.wait(0.5)  # blocked on the cache's lock
    assert entered.wait(10)
    thread.join()


def test_the_fingerprint_records_the_precision_the_features_were_computed_in(tmp_path: Path, setup: Setup) -> None:
    run_preload(setup, tmp_path / "cache", precision="bf16")  # on the CPU autocast does not run: fp32
    assert FeatureCache.open(tmp_path / "cache").fingerprint["precision"] == "fp32"


def _probe_and_fpt(data: Path, lpm_dir: Path) -> tuple[Setup, Setup]:
    fpt_plus = make_setup(data, lpm_dir, tapped_layers=[1, 3])
    probe_config = LinearProbeConfig(backbone=BackboneSpec(str(lpm_dir)), num_classes=1, lpm_input_size=64)
    return fpt_plus, Setup(*prepare(data, probe_config, fast_training(None), progress=False))


def test_one_shared_lpm_pass_fills_each_methods_cache_exactly_as_its_own_preload_does(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    fpt_plus, probe = _probe_and_fpt(image_data, tiny_lpm_dir)
    run_preload(fpt_plus, tmp_path / "alone" / "fpt+", dtype="float32")
    run_preload(probe, tmp_path / "alone" / "linear", dtype="float32")
    targets = [
        (fpt_plus.model, fast_training(tmp_path / "shared" / "fpt+", cache_dtype="float32", batch_size=8)),
        (probe.model, fast_training(tmp_path / "shared" / "linear", cache_dtype="float32")),
    ]
    forwards: dict[str, int] = {"fpt+": 0, "linear": 0}
    hooks = [
        setup.model.frozen_lpm().patch_embed.register_forward_hook(
            lambda *_, m=method: forwards.update({m: forwards[m] + 1})
        )
        for method, setup in (("fpt+", fpt_plus), ("linear", probe))
    ]
    try:
        summaries = preload_together(targets, fpt_plus.dataset, fpt_plus.normalization, progress=False)
    finally:
        for hook in hooks:
            hook.remove()

    assert forwards == {"fpt+": -(-NUM_IMAGES // 8), "linear": 0}  # one forward of the first LPM per batch
    assert [(s.computed, s.reused) for s in summaries] == [(NUM_IMAGES, 0), (NUM_IMAGES, 0)]
    for method in ("fpt+", "linear"):
        alone, shared = FeatureCache.open(tmp_path / "alone" / method), FeatureCache.open(tmp_path / "shared" / method)
        assert shared.fingerprint == alone.fingerprint and shared.layout == alone.layout
        for key in all_keys(fpt_plus.dataset):
            for name, part in alone.get(key).items():
                assert torch.equal(shared.get(key)[name], part), (method, key, name)


def test_a_shared_pass_computes_only_what_each_cache_lacks(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    fpt_plus, probe = _probe_and_fpt(image_data, tiny_lpm_dir)
    run_preload(fpt_plus, tmp_path / "fpt+")
    targets = [(fpt_plus.model, fast_training(tmp_path / "fpt+", cache_dtype="float16"))]
    targets.append((probe.model, fast_training(tmp_path / "linear", cache_dtype="float16")))
    before = (tmp_path / "fpt+" / "index.jsonl").read_bytes()

    summaries = preload_together(targets, fpt_plus.dataset, fpt_plus.normalization, progress=False)

    assert [(s.computed, s.reused) for s in summaries] == [(0, NUM_IMAGES), (NUM_IMAGES, 0)]
    assert (tmp_path / "fpt+" / "index.jsonl").read_bytes() == before
    assert sorted(FeatureCache.open(tmp_path / "linear").entries) == sorted(all_keys(probe.dataset))


def test_a_shared_pass_refuses_methods_that_read_the_lpm_at_other_sizes(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    fpt_plus, _ = _probe_and_fpt(image_data, tiny_lpm_dir)
    probe_config = LinearProbeConfig(backbone=BackboneSpec(str(tiny_lpm_dir)), num_classes=1, lpm_input_size=32)
    probe = Setup(*prepare(image_data, probe_config, fast_training(None), progress=False))
    targets = [(fpt_plus.model, fast_training(tmp_path / "a")), (probe.model, fast_training(tmp_path / "b"))]

    with pytest.raises(FPTError, match="different LPMs or LPM input sizes; preload them one at a time"):
        preload_together(targets, fpt_plus.dataset, fpt_plus.normalization, progress=False)


def test_background_writes_keep_their_order_and_wait_for_each_other_at_the_end() -> None:
    done: list[int] = []
    release = threading.Event()

    def write(number: int) -> None:
        if number == 0:
            release.wait(timeout=10)  # the first write is slow: the next ones queue behind it
        done.append(number)

    with InOrderWrites(depth=2) as writes:
        writes.submit(write, 0)
        writes.submit(write, 1)
        assert done == []  # neither has run: the caller went on
        release.set()
        for number in range(2, 6):
            writes.submit(write, number)
    assert done == list(range(6))


def test_a_failed_background_write_stops_the_queued_ones_and_raises_in_the_caller() -> None:
    done: list[int] = []

    def write(number: int) -> None:
        if number == 1:
            raise FPTError("disk full")
        done.append(number)

    with pytest.raises(FPTError, match="disk full"), InOrderWrites(depth=2) as writes:
        for number in range(6):
            writes.submit(write, number)
    assert done == [0]


def test_an_interrupted_caller_still_gets_every_submitted_write_done() -> None:
    done: list[int] = []

    with pytest.raises(KeyboardInterrupt), InOrderWrites(depth=3) as writes:
        for number in range(3):
            writes.submit(lambda number: (time.sleep(0.05), done.append(number)), number)
        raise KeyboardInterrupt
    assert done == [0, 1, 2]


def test_a_writer_starts_a_fresh_shard_after_a_failed_write(
    tmp_path: Path, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_preload(setup, tmp_path / "reference")
    reference = FeatureCache.open(tmp_path / "reference")
    keys = sorted(reference.entries)
    cache = FeatureCache.create(tmp_path / "cache", reference.fingerprint, reference.layout)
    parts = {name: torch.stack([reference.get(key)[name] for key in keys]).float() for name in ("keys", "values")}
    digests = [reference.entries[key].sha256 for key in keys]
    with cache.writer() as writer:
        writer.add(keys[:2], {name: part[:2] for name, part in parts.items()}, digests[:2])
        first_shard = writer.shard_name
        written_so_far = writer.shard.write

        def half_then_fail(data: bytes) -> None:
            written_so_far(bytes(data)[: len(data) // 2])
            raise OSError(errno.EIO, "I/O error")

        with monkeypatch.context() as patch:  # the next batch fails half way through its records
            patch.setattr(writer.shard, "write", half_then_fail)
            with pytest.raises(OSError):
                writer.add(keys[2:4], {name: part[2:4] for name, part in parts.items()}, digests[2:4])
        writer.add(keys[4:], {name: part[4:] for name, part in parts.items()}, digests[4:])
        assert writer.shard_name != first_shard

    written = FeatureCache.open(tmp_path / "cache")
    assert sorted(written.entries) == sorted(keys[:2] + keys[4:])
    for key in written.entries:
        assert all(written.get(key)[name].equal(reference.get(key)[name]) for name in ("keys", "values"))
