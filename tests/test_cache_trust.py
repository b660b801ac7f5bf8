"""Trusting the data: the feature cache never hands out features of other bytes than the image's (changed
images are recomputed or refused, damaged records and index lines are caught, a complete cache is read without
its lock), one process trains into a run, and unreadable images are all named before anything runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fpt.cache
from fpt.cache import FeatureCache, content_digest
from fpt.cli import main
from fpt.errors import FPTError
from fpt.evaluate import evaluate_run
from fpt.run import training_into
from fpt.task import prepare
from fpt.train import resume, train
from tests.pipeline_fixtures import (
    CLASSES,
    NUM_IMAGES,
    SPLIT_SIZES,
    assert_features_equal,
    cli_model_args,
    cli_run_args,
    fast_training,
    one_line_error,
    preload_into,
    reference_features,
    tiny_config,
    train_until_interrupted,
    write_image_folder,
)

pytest_plugins = ("tests.pipeline_fixtures",)

CHANGED = "test/b/img001.png"


def replace_keeping_size_and_mtime(path: Path, seed: int) -> None:
    """Other pixels in a file of the same size and modification time (uncompressed PNG of the same shape)."""
    status = path.stat()
    with Image.open(path) as image:
        shape = (image.height, image.width, 3)
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path, compress_level=0)  # uncompressed PNGs of one shape have one size
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A private copy of the tiny dataset, saved uncompressed so that a replacement can keep the file size."""
    root = write_image_folder(tmp_path / "data")
    for path in root.rglob("*.png"):
        Image.open(path).save(path, compress_level=0)
    return root


def test_an_image_replaced_with_the_same_size_and_mtime_is_recomputed_by_train(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path
) -> None:
    training = fast_training(tmp_path / "cache", epochs=1)
    dataset, model, normalization = prepare(data, tiny_config(tiny_lpm_dir), training, progress=False)
    preload_into(model, dataset, tmp_path / "cache", normalization)
    before = (data / CHANGED).stat()
    replace_keeping_size_and_mtime(data / CHANGED, seed=7)
    after = (data / CHANGED).stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    summary = preload_into(model, dataset, tmp_path / "cache", normalization)

    assert (summary.computed, summary.reused) == (1, NUM_IMAGES - 1)
    cache = FeatureCache.open(tmp_path / "cache")
    assert cache.entries[CHANGED].sha256 == content_digest(data / CHANGED)
    assert_features_equal(cache.get(CHANGED), reference_features(model, dataset, normalization)[CHANGED], torch.float16)


def test_evaluate_refuses_a_cache_whose_test_images_changed_and_names_them(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path
) -> None:
    train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), fast_training(tmp_path / "cache"), progress=False)
    replace_keeping_size_and_mtime(data / CHANGED, seed=7)

    with pytest.raises(FPTError, match=rf"1 images are not cached as they are now .*\({CHANGED}: changed since"):
        evaluate_run(tmp_path / "run", "test")
    assert evaluate_run(tmp_path / "run", "val")["auc"] is not None  # the validation images did not change


def test_evaluate_refuses_features_that_another_dataset_with_the_same_paths_preloaded(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path
) -> None:
    train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), fast_training(tmp_path / "cache"), progress=False)
    other = write_image_folder(tmp_path / "other", seed=5)  # the same relative paths, other pixels
    dataset, model, normalization = prepare(other, tiny_config(tiny_lpm_dir), fast_training(None), progress=False)
    preload_into(model, dataset, tmp_path / "cache", normalization)  # overwrites every entry with its own

    with pytest.raises(FPTError, match=f"{SPLIT_SIZES['test'] * len(CLASSES)} images are not cached as they are now"):
        evaluate_run(tmp_path / "run", "test")


def test_resume_refuses_to_continue_on_features_of_images_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path, tiny_lpm_dir: Path
) -> None:
    training = fast_training(tmp_path / "cache", epochs=3)
    train_until_interrupted(monkeypatch, data, tmp_path / "run", tiny_config(tiny_lpm_dir), training)
    replace_keeping_size_and_mtime(data / "train/a/img002.png", seed=3)

    with pytest.raises(FPTError, match=r"train/a/img002\.png: changed since.*recompute them with `fpt preload`"):
        resume(tmp_path / "run", progress=False)


def _preloaded(tmp_path: Path, data: Path, lpm_dir: Path) -> tuple[FeatureCache, object]:
    setup = prepare(data, tiny_config(lpm_dir), fast_training(None), progress=False)
    preload_into(setup.model, setup.dataset, tmp_path / "cache", setup.normalization, batch_size=8)
    return FeatureCache.open(tmp_path / "cache"), setup


def test_flipped_bytes_in_a_record_are_refused_naming_the_image_and_the_repair(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path
) -> None:
    cache, _ = _preloaded(tmp_path, data, tiny_lpm_dir)
    entry = cache.entries[CHANGED]
    with (cache.directory / entry.shard).open("r+b") as shard:
        shard.seek(entry.slot * cache.layout.nbytes + 5)
        byte = shard.read(1)
        shard.seek(-1, os.SEEK_CUR)
        shard.write(bytes([byte[0] ^ 0x10]))

    with pytest.raises(FPTError, match=rf"'{CHANGED}' .* corrupt .*fails its checksum.*fpt cache verify"):
        FeatureCache.open(cache.directory).get(CHANGED)


def test_a_truncated_shard_is_refused_naming_the_image(tmp_path: Path, data: Path, tiny_lpm_dir: Path) -> None:
    cache, _ = _preloaded(tmp_path, data, tiny_lpm_dir)
    entry = cache.entries[CHANGED]
    os.truncate(cache.directory / entry.shard, entry.slot * cache.layout.nbytes + 3)

    with pytest.raises(FPTError, match=rf"'{CHANGED}' .* corrupt .*is truncated"):
        FeatureCache.open(cache.directory).get(CHANGED)


def test_two_index_entries_that_share_a_record_are_both_dropped_and_recomputed(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path
) -> None:
    cache, setup = _preloaded(tmp_path, data, tiny_lpm_dir)
    index = cache.directory / "index.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    lines[1]["slot"] = lines[0]["slot"]  # one changed slot number: two images on one record
    index.write_text("".join(json.dumps(line) + "\n" for line in lines))
    damaged = {lines[0]["key"], lines[1]["key"]}

    assert damaged.isdisjoint(FeatureCache.open(cache.directory).entries)
    summary = preload_into(setup.model, setup.dataset, cache.directory, setup.normalization)
    assert (summary.computed, summary.reused) == (2, NUM_IMAGES - 2)
    references = reference_features(setup.model, setup.dataset, setup.normalization)
    repaired = FeatureCache.open(cache.directory)
    for key in damaged:
        assert_features_equal(repaired.get(key), references[key], torch.float16)


@pytest.mark.parametrize("garbage", [b"\xff\xfe not utf-8\n", b'{"key": "x"}\n', b"[1, 2]\n"])
def test_a_garbled_index_line_is_skipped_and_its_image_recomputed(
    tmp_path: Path, data: Path, tiny_lpm_dir: Path, garbage: bytes
) -> None:
    cache, setup = _preloaded(tmp_path, data, tiny_lpm_dir)
    index = cache.directory / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join([*lines[:3], garbage, *lines[4:]]))

    assert len(FeatureCache.open(cache.directory)) == NUM_IMAGES - 1
    summary = preload_into(setup.model, setup.dataset, cache.directory, setup.normalization)
    assert (summary.computed, summary.reused) == (1, NUM_IMAGES - 1)


def test_a_complete_cache_is_used_without_taking_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path, tiny_lpm_dir: Path
) -> None:
    # as on a read-only filesystem, where the lock file cannot be created (tests may run as root, which
    # ignores file permissions, so the lock is made to fail instead)
    training = fast_training(tmp_path / "cache")
    dataset, model, normalization = prepare(data, tiny_config(tiny_lpm_dir), training, progress=False)
    preload_into(model, dataset, tmp_path / "cache", normalization)

    def read_only(*args: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fpt.cache.CacheWriter, "__init__", read_only)
    summary = preload_into(model, dataset, tmp_path / "cache", normalization)
    assert (summary.computed, summary.reused) == (0, NUM_IMAGES)
    results = train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    assert results.best["auc"] is not None


def test_digests_of_every_image_are_their_sha256(data: Path) -> None:
    keys = [path.relative_to(data).as_posix() for path in sorted(data.rglob("*.png"))]
    digests = fpt.cache.content_digests(data, keys)
    assert digests == {key: hashlib.sha256((data / key).read_bytes()).hexdigest() for key in keys}
    shutil.copy(data / keys[0], data / "copy.png")
    assert content_digest(data / "copy.png") == digests[keys[0]]
    with pytest.raises(FPTError, match=r"image not found: .*absent\.png"):
        content_digest(data / "absent.png")


def test_cli_cache_verify_drops_the_corrupt_record_and_the_next_preload_recomputes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Path, tiny_lpm_dir: Path
) -> None:
    cache, setup = _preloaded(tmp_path, data, tiny_lpm_dir)
    assert main(["cache", "verify", str(cache.directory)]) == 0
    assert f"{NUM_IMAGES} records verified" in capsys.readouterr().out
    entry = cache.entries[CHANGED]
    with (cache.directory / entry.shard).open("r+b") as shard:
        shard.seek(entry.slot * cache.layout.nbytes)
        shard.write(b"\0" * 16)

    assert main(["cache", "verify", str(cache.directory)]) == 1
    assert f"1 corrupt records dropped from {cache.directory} ({CHANGED})" in capsys.readouterr().out
    assert CHANGED not in FeatureCache.open(cache.directory)
    summary = preload_into(setup.model, setup.dataset, cache.directory, setup.normalization)
    assert (summary.computed, summary.reused) == (1, NUM_IMAGES - 1)
    assert main(["cache", "verify", str(cache.directory)]) == 0


def test_cli_cache_info_shows_entries_layout_and_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Path, tiny_lpm_dir: Path
) -> None:
    cache, _ = _preloaded(tmp_path, data, tiny_lpm_dir)
    assert main(["cache", "info", str(cache.directory), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == NUM_IMAGES and info["legacy_entries"] == 0
    assert info["layout"] == {"parts": {"keys": [2, 4, 5, 16], "values": [2, 4, 5, 16]}, "dtype": "float16"}
    assert info["fingerprint"] == cache.fingerprint
    assert main(["cache", "info", str(cache.directory)]) == 0
    table = capsys.readouterr().out
    assert f"entries         {NUM_IMAGES}" in table and "keys [2, 4, 5, 16], values [2, 4, 5, 16] in float16" in table


def test_cli_cache_info_of_a_folder_without_a_cache_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cache", "info", str(tmp_path)]) == 1
    assert "no feature cache at" in one_line_error(capsys)


def test_records_left_without_a_manifest_are_never_adopted(tmp_path: Path, data: Path, tiny_lpm_dir: Path) -> None:
    # the state an --overwrite interrupted after removing the manifest leaves: the old records, no manifest
    cache, setup = _preloaded(tmp_path, data, tiny_lpm_dir)
    (cache.directory / "manifest.json").unlink()

    summary = preload_into(setup.model, setup.dataset, cache.directory, setup.normalization)

    assert (summary.computed, summary.reused) == (NUM_IMAGES, 0)
    assert sorted(path.name for path in cache.directory.glob("shard-*")) == ["shard-00000.bin"]


def test_overwrite_waits_for_a_preload_holding_the_cache(tmp_path: Path, data: Path, tiny_lpm_dir: Path) -> None:
    cache, setup = _preloaded(tmp_path, data, tiny_lpm_dir)
    done = threading.Event()

    def overwrite() -> None:
        preload_into(setup.model, setup.dataset, cache.directory, setup.normalization, overwrite=True)
        done.set()

    with cache.writer():  # as a concurrent preload would hold it
        thread = threading.Thread(target=overwrite)
        thread.start()
        assert not done.wait(1.0)
        assert (cache.directory / "manifest.json").is_file() and len(FeatureCache.open(cache.directory)) == NUM_IMAGES
    thread.join(60)
    assert done.is_set() and len(FeatureCache.open(cache.directory)) == NUM_IMAGES


def test_a_cache_path_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Path, tiny_lpm_dir: Path
) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert main(["preload", str(data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "file")]) == 1
    assert "is a file, not a directory; pass another --cache" in one_line_error(capsys)


def test_a_second_process_training_into_the_same_run_is_refused(tmp_path: Path, data: Path, tiny_lpm_dir: Path) -> None:
    training = fast_training(tmp_path / "cache", epochs=1)
    refused = pytest.raises(FPTError, match=r"another fpt process is training into .*run; wait for it to finish")
    with training_into(tmp_path / "run"), refused:  # held as a first `fpt train --run RUN` would hold it
        train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    assert not (tmp_path / "run" / "run.json").exists()
    train(data, tmp_path / "run", tiny_config(tiny_lpm_dir), training, progress=False)
    with training_into(tmp_path / "run"), pytest.raises(FPTError, match="another fpt process is training into"):
        resume(tmp_path / "run", progress=False)


def test_a_run_path_that_is_a_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Path, tiny_lpm_dir: Path
) -> None:
    (tmp_path / "file").write_text("not a folder")
    args = ["train", str(data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]
    assert main([*args, "--run", str(tmp_path / "file"), "--epochs", "1"]) == 1
    assert f"the run path {tmp_path / 'file'} is a file, not a directory; pass another --run" in one_line_error(capsys)


def test_every_unreadable_image_is_listed_in_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: Path, tiny_lpm_dir: Path
) -> None:
    (data / "train" / "a" / "img001.png").write_text("not an image")
    (data / "test" / "c" / "img000.png").write_bytes((data / "test" / "c" / "img000.png").read_bytes()[:100])
    args = ["train", str(data), *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]

    assert main([*args, "--run", str(tmp_path / "run"), "--epochs", "1"]) == 1

    error = one_line_error(capsys)
    assert "2 images of" in error and "train/a/img001.png (" in error and "test/c/img000.png (" in error
    assert "replace them, or remove them from the dataset" in error
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "run.json").exists()
