"""Preload throughput (issue 12): `fpt preload` with 1 and N processes (torchrun) against the physical bound, a
bare forward of the same backbone on the same images at the same batch size.

    python benchmarks/preload_throughput.py DATA [--arch vit_base_patch16_384] [--input-size 512] \
        [--batch-size 16] [--processes 1,2] [--repeats 2] [--out preload_throughput.json]

DATA is an image folder or CSV (e.g. `fpt synth DATA --train 48 --val 8 --test 8`). The backbone is the timm
architecture ARCH with random weights, saved once as a local checkpoint directory (nothing is downloaded), read
by FPT+'s preset. Four rates, in images per second, each the median of the repeats, interleaved:

- bare forward: ``forward_features`` of the timm model on the already decoded and resized images;
- bare forward to the last tap: the same, stopped once the last tapped block's q, k, v are projected (the part of
  the model the frozen encoder runs, without its taps and importance scores);
- frozen encoder: FPT+'s ``preload_features`` (the same forward with its taps and importance scores) on them;
- `fpt preload`, one process and each N (torchrun): the whole preload into an empty cache (hashing, decoding,
  the LPM, selection, writing), timed by the preload itself, without interpreter and model start-up.

Prints a Markdown table and writes the numbers to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

from fpt.config import BackboneSpec, FPTPlusConfig, TrainingConfig
from fpt.data.images import load_image
from fpt.data.transforms import lpm_view
from fpt.runtime import select_device
from fpt.task import prepare


def save_random_backbone(arch: str, directory: Path) -> Path:
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    timm.models.save_for_hf(model, str(directory), model_args={"num_classes": 0}, safe_serialization=True)
    return directory


def images_per_second(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def time_forwards(functions: dict[str, Callable], batches: list[torch.Tensor], device: torch.device) -> dict:
    """Seconds of each function over every batch (each moved to ``device`` first), after one warm-up batch each;
    the functions take turns batch by batch, so that a drift in the machine's speed falls on all of them alike."""
    seconds = dict.fromkeys(functions, 0.0)
    with torch.no_grad():
        for turn, batch in enumerate([batches[0], *batches]):  # turn 0: the warm-up
            for name, function in functions.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                function(batch.to(device, non_blocking=True))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if turn:
                    seconds[name] += time.perf_counter() - started
    return seconds


class _Stop(Exception):
    pass


def forward_to_block_qkv(lpm: torch.nn.Module, block: int):
    """A function running ``lpm`` on a batch until block ``block``'s attention has projected its q, k, v."""

    def stop(*_) -> None:
        raise _Stop

    def forward(images: torch.Tensor) -> None:
        hook = lpm.blocks[block].attn.qkv.register_forward_hook(stop)
        try:
            lpm.forward_features(images)
        except _Stop:
            pass
        finally:
            hook.remove()

    return forward


def preload_command(
    data: Path, backbone: Path, cache: Path, input_size: int, batch_size: int, device: str
) -> list[str]:
    model = ["--backbone", str(backbone), "--method", "fpt+", "--input-size", str(input_size)]
    return ["preload", str(data), *model, "--cache", str(cache), "--batch-size", str(batch_size), "--device", device]


def time_preload(processes: int, command: list[str]) -> float:
    """The preload's own seconds (its report line), with 1 process or torchrun with ``processes``."""
    launcher = [sys.executable, "-m", "fpt"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launcher += ["-m", "fpt"]
    result = subprocess.run([*launcher, *command], capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) s\s*$", result.stdout.strip()).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--arch", default="vit_base_patch16_384")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--processes", default="1,2", help="process counts for `fpt preload` (1 = no torchrun)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto: cuda if there is a GPU, else cpu")
    parser.add_argument("--out", type=Path, default=Path("preload_throughput.json"))
    args = parser.parse_args()
    counts = [int(value) for value in args.processes.split(",")]
    device = select_device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        backbone = save_random_backbone(args.arch, scratch / "backbone")
        config = FPTPlusConfig(backbone=BackboneSpec(str(backbone)), num_classes=2, lpm_input_size=args.input_size)
        dataset, model, normalization = prepare(args.data, config, TrainingConfig(cache_dir=None), progress=False)
        paths = [dataset.root / sample.path for split in dataset.splits.values() for sample in split]
        to_lpm = lpm_view(args.input_size, normalization)
        images = torch.stack([to_lpm(load_image(path)) for path in paths])
        batches = list(images.split(args.batch_size))
        model.to(device)
        lpm = model.frozen_lpm()
        forwards = {
            "bare forward": lpm.forward_features,
            "bare forward to the last tap": forward_to_block_qkv(lpm, model.config.tapped_layers[-1]),
            "frozen encoder (FPT+ taps)": model.preload_features,
        }
        rates: dict[str, list[float]] = {name: [] for name in forwards}
        rates |= {f"fpt preload, {n} process{'es' if n > 1 else ''}": [] for n in counts}
        for repeat in range(args.repeats):
            for name, seconds in time_forwards(forwards, batches, device).items():
                rates[name].append(images_per_second(len(images), seconds))
            for n in counts:
                cache = scratch / f"cache-{n}-{repeat}"
                seconds = time_preload(
                    n, preload_command(args.data, backbone, cache, args.input_size, args.batch_size, args.device)
                )
                rates[f"fpt preload, {n} process{'es' if n > 1 else ''}"].append(
                    images_per_second(len(images), seconds)
                )
    bound = statistics.median(rates["bare forward"])
    summary = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "arch": args.arch,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "images": len(images),
        "rates": rates,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    setting = f"{args.input_size} px, batch {args.batch_size}, {len(images)} images"
    print(f"{args.arch} (random weights), {setting}; {summary['machine']}")
    print("\n| what | images/s (median of repeats) | of the bare forward |\n| --- | ---: | ---: |")
    for name, values in rates.items():
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / bound:.0%} |")


if __name__ == "__main__":
    main()
