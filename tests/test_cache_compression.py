"""A zstd-compressed cache (``--cache-compression zstd``): the same records in fewer bytes, each frame at its own
offset, checked as decompressed, and refused when damaged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fpt.cache
from fpt.cache import FeatureCache, RecordLayout
from fpt.cli import main
from fpt.errors import FPTError
from fpt.task import prepare
from tests.pipeline_fixtures import (
    all_keys,
    cli_model_args,
    cli_run_args,
    fast_training,
    metric_lines,
    preload_into,
    tiny_config,
)

pytest_plugins = ("tests.pipeline_fixtures",)


def _shard_bytes(cache: FeatureCache) -> int:
    return sum(path.stat().st_size for path in cache.directory.glob("shard-*.bin"))


@pytest.fixture
def setup(image_data: Path, tiny_lpm_dir: Path):
    return prepare(image_data, tiny_config(tiny_lpm_dir), fast_training(None), progress=False)


def test_a_compressed_cache_holds_the_same_records_in_fewer_bytes(tmp_path: Path) -> None:
    # records of a realistic size (a tiny LPM's are too small for compression to pay for its frame)
    shape = (3, 4, 200, 32)
    generator = torch.Generator().manual_seed(0)
    keys = [f"class/{index}.png" for index in range(12)]
    parts = {name: torch.randn(len(keys), *shape, generator=generator) for name in ("keys", "values")}
    caches = {}
    for compression in ("none", "zstd"):
        fingerprint = {"dtype": "int8", **({} if compression == "none" else {"compression": compression})}
        layout = RecordLayout({"keys": shape, "values": shape}, "int8", compression)
        cache = FeatureCache.create(tmp_path / compression, fingerprint, layout)
        with cache.writer() as writer:
            for start in range(0, len(keys), 5):
                batch_keys = keys[start : start + 5]
                batch = {name: part[start : start + 5] for name, part in parts.items()}
                writer.add(batch_keys, batch, [f"digest of {key}" for key in batch_keys])
        caches[compression] = FeatureCache.open(tmp_path / compression, fingerprint)
    plain, compressed = caches["none"], caches["zstd"]

    assert compressed.layout.compression == "zstd" and "compression" not in plain.layout.to_dict()
    manifests = {name: json.loads((tmp_path / name / "manifest.json").read_text()) for name in caches}
    assert (manifests["none"]["format"], manifests["zstd"]["format"]) == (2, 3)  # an older fpt refuses format 3
    for key in keys:
        expected, found = plain.get(key), compressed.get(key)
        assert sorted(found) == sorted(expected) == ["keys", "keys_scale", "values", "values_scale"]
        assert all(found[name].equal(expected[name]) for name in expected)
    assert _shard_bytes(plain) == len(keys) * plain.layout.nbytes
    # int8 codes of Gaussian values fill their range: 96 % (an LPM's heavier-tailed features: about 93 %)
    assert _shard_bytes(compressed) < 0.98 * _shard_bytes(plain)
    lines = [json.loads(line) for line in (tmp_path / "zstd" / "index.jsonl").read_text().splitlines()]
    assert [line["offset"] for line in lines] == [sum(line["size"] for line in lines[:i]) for i in range(len(lines))]


def test_training_from_a_compressed_cache_gives_the_same_run(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path
) -> None:
    for compression in ("none", "zstd"):
        args = ["train", str(image_data), "--run", str(tmp_path / f"run_{compression}"), "--epochs", "2"]
        options = ["--cache-dtype", "int8", "--cache-compression", compression]
        cache = tmp_path / f"cache_{compression}"
        assert main([*args, *options, *cli_model_args(tiny_lpm_dir), *cli_run_args(cache)]) == 0

    assert metric_lines(tmp_path / "run_zstd") == metric_lines(tmp_path / "run_none")
    for name in ("test_best.csv", "test_last.csv"):
        predictions = [(tmp_path / f"run_{c}" / "predictions" / name).read_text() for c in ("none", "zstd")]
        assert predictions[0] == predictions[1]


def test_records_of_a_compressed_cache_fill_several_shards_and_a_rerun_adds_its_own(
    tmp_path: Path, setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, model, normalization = setup
    keys = all_keys(dataset)
    preload_into(model, dataset, tmp_path / "reference", normalization, "int8")
    reference = FeatureCache.open(tmp_path / "reference")
    monkeypatch.setattr(fpt.cache, "SHARD_BYTES", reference.layout.nbytes * 5)  # a new shard every batch or two
    preload_into(model, dataset, tmp_path / "cache", normalization, "int8", cache_compression="zstd")
    index = tmp_path / "cache" / "index.jsonl"
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[: len(lines) // 2]) + "\n")  # as if killed half way: a rerun completes it

    summary = preload_into(model, dataset, tmp_path / "cache", normalization, "int8", cache_compression="zstd")

    cache = FeatureCache.open(tmp_path / "cache")
    assert (summary.computed, summary.reused) == (len(keys) - len(lines) // 2, len(lines) // 2)
    assert len({entry.shard for entry in cache.entries.values()}) >= 3
    for key in keys:
        expected, found = reference.get(key), cache.get(key)
        assert all(found[name].equal(expected[name]) for name in expected)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [("flip", "does not decompress|fails its checksum"), ("header", "does not decompress"), ("truncate", "decompress")],
)
def test_a_damaged_compressed_record_is_refused_and_cache_verify_drops_it(
    tmp_path: Path, setup, damage: str, problem: str
) -> None:
    dataset, model, normalization = setup
    preload_into(model, dataset, tmp_path / "cache", normalization, "int8", cache_compression="zstd")
    cache = FeatureCache.open(tmp_path / "cache")
    key = all_keys(dataset)[-1]  # the last record of its shard, so that truncating damages it alone
    entry = cache.entries[key]
    path = cache.directory / entry.shard
    if damage == "truncate":
        os.truncate(path, entry.offset + entry.size - 3)
    else:
        with path.open("r+b") as shard:
            shard.seek(entry.offset + (6 if damage == "header" else entry.size // 2))  # a content-size byte, or data
            byte = shard.read(1)
            shard.seek(-1, os.SEEK_CUR)
            shard.write(bytes([byte[0] ^ 0x40]))

    with pytest.raises(FPTError, match=rf"'{key}' .* corrupt .*({problem}).*fpt cache verify"):
        FeatureCache.open(cache.directory).get(key)
    assert FeatureCache.open(cache.directory).verify() == [key]


def test_a_cache_of_another_compression_is_refused_saying_so(tmp_path: Path, setup) -> None:
    dataset, model, normalization = setup
    preload_into(model, dataset, tmp_path / "cache", normalization, "int8")

    with pytest.raises(FPTError, match=r"compression: cache has None, this run needs 'zstd'.*--overwrite"):
        preload_into(model, dataset, tmp_path / "cache", normalization, "int8", cache_compression="zstd")


def test_cli_cache_info_shows_the_compression(
    tmp_path: Path, image_data: Path, tiny_lpm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["preload", str(image_data), "--cache-dtype", "int8", "--cache-compression", "zstd"]
    assert main([*args, *cli_model_args(tiny_lpm_dir), *cli_run_args(tmp_path / "cache")]) == 0
    capsys.readouterr()

    assert main(["cache", "info", str(tmp_path / "cache")]) == 0
    record = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("record"))
    assert record.endswith(" bytes, zstd-compressed") and " in int8, " in record


def test_an_unknown_compression_is_refused_naming_the_choices(tmp_path: Path, setup) -> None:
    dataset, model, normalization = setup
    with pytest.raises(FPTError, match="cache compression 'gzip' is not one of none, zstd"):
        preload_into(model, dataset, tmp_path / "cache", normalization, "int8", cache_compression="gzip")
    assert not (tmp_path / "cache").exists()
