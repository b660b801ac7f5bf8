"""What the cache's guarantees cost (issue 11): preload throughput and training epoch time with the content
hashes and record checksums on, and with them switched off in the same process, interleaved.

    python benchmarks/verification_cost.py DATA [--repeats 3] [--epochs 3]

DATA is a dataset folder or CSV (e.g. `fpt synth DATA`); the demo LPM reads it at 512 px, FPT+ preset. "Off"
replaces the SHA-256 of each image by its path (preload), skips the up-front header check of every image and
drops the CRC-32 of each record (read in training); everything else is the same code. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import fpt.cache
import fpt.preload
import fpt.task
from fpt.config import BackboneSpec, FPTPlusConfig, TrainingConfig
from fpt.preload import preload
from fpt.task import prepare
from fpt.train import train


@contextmanager
def verification(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    read_index = fpt.cache._read_index

    def without_checksums(path: Path) -> dict[str, fpt.cache.CacheEntry]:
        return {key: entry._replace(crc32=None) for key, entry in read_index(path).items()}

    def paths_as_digests(root: Path, keys: list[str], progress: bool = False) -> dict[str, str]:
        return {key: key for key in keys}

    with (
        mock.patch.object(fpt.preload, "content_digests", paths_as_digests),
        mock.patch.object(fpt.cache, "_read_index", without_checksums),
        mock.patch.object(fpt.task, "unreadable_images", lambda root, keys: {}),
    ):
        yield


def measure_preload(data: Path, cache: Path, enabled: bool) -> float:
    """Images per second of a preload into an empty cache."""
    training = TrainingConfig(cache_dir=str(cache), num_workers=None)
    config = FPTPlusConfig(backbone=BackboneSpec("fpt:demo"), num_classes=2)
    dataset, model, normalization = prepare(data, config, training, progress=False)
    with verification(enabled):
        started = time.perf_counter()
        summary = preload(model, dataset, normalization, training, progress=False)
        seconds = time.perf_counter() - started
    return summary.computed / seconds


def measure_training(data: Path, cache: Path, run: Path, enabled: bool, epochs: int) -> float:
    """Mean seconds of the epochs after the first of a run from a complete cache."""
    training = TrainingConfig(cache_dir=str(cache), epochs=epochs, num_workers=None)
    with verification(enabled):
        train(data, run, FPTPlusConfig(backbone=BackboneSpec("fpt:demo"), num_classes=2), training, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(record["seconds"] for record in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="dataset folder or CSV")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved on/off pairs (default: 3)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training run (default: 3)")
    args = parser.parse_args()
    preload_rates: dict[bool, list[float]] = {True: [], False: []}
    epoch_seconds: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for enabled in (True, False) if repeat % 2 == 0 else (False, True):
                cache = Path(scratch) / f"cache-{repeat}-{enabled}"
                preload_rates[enabled].append(measure_preload(args.data, cache, enabled))
                run = Path(scratch) / f"run-{repeat}-{enabled}"
                epoch_seconds[enabled].append(measure_training(args.data, cache, run, enabled, args.epochs))
                print(
                    f"repeat {repeat} verification {'on' if enabled else 'off'}: "
                    f"{preload_rates[enabled][-1]:.2f} img/s, {epoch_seconds[enabled][-1]:.2f} s/epoch",
                    flush=True,
                )

    def row(name: str, values: dict[bool, list[float]], unit: str, higher_is_better: bool) -> str:
        on, off = statistics.median(values[True]), statistics.median(values[False])
        cost = (off / on - 1) if higher_is_better else (on / off - 1)
        return f"| {name} | {on:.3f} {unit} | {off:.3f} {unit} | {100 * cost:+.1f} % |"

    print("| measure (median of repeats) | verification on | off | cost of verification |")
    print("| --- | ---: | ---: | ---: |")
    print(row("preload throughput", preload_rates, "img/s", higher_is_better=True))
    print(row("training epoch (FPT+, from the cache)", epoch_seconds, "s", higher_is_better=False))


if __name__ == "__main__":
    main()
