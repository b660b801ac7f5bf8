"""How much int8 keys/values change a trained FPT/FPT+ model's logits (issue 12), for two scale granularities:
one float16 scale per token of each layer and head (what `--cache-dtype int8` stores) and one per layer and head.

    python benchmarks/int8_error.py RUN CACHE [--images 64]

RUN is a finished `fpt train` run of FPT or FPT+ and CACHE its float16 (or float32) feature cache. Its test
images' cached keys/values are quantised both ways and fed to the run's best checkpoint with random side views
(the same for every variant); prints the relative error of the keys and the logits' error against the cache's
own dtype.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from fpt.cache import FeatureCache
from fpt.models.build import load_model
from fpt.quantization import dequantize, quantize_int8
from fpt.run import Run


def quantized(values: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Symmetric int8 with one float16 scale per slice over ``dims``, dequantised back to float32: over the last
    dimension exactly what the int8 cache stores (``fpt.quantization``), over more a coarser variant of it."""
    if dims == (-1,):
        return dequantize(*quantize_int8(values))
    scale = (values.abs().amax(dim=dims, keepdim=True) / 127).to(torch.float16).float()
    return (values / scale.clamp_min(torch.finfo(torch.float32).tiny)).round().clamp(-127, 127) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("cache", type=Path)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    run = Run.load(args.run)
    model = load_model(args.run / "checkpoints" / "best", load_lpm=False).eval()
    cache = FeatureCache.open(args.cache)
    keys_of = [sample.path for sample in run.dataset.splits["test"]][: args.images]
    keys = torch.stack([cache.get(key)["keys"] for key in keys_of]).float()
    values = torch.stack([cache.get(key)["values"] for key in keys_of]).float()
    size = model.config.side_input_size
    side = torch.randn(len(keys_of), 3, size, size, generator=torch.Generator().manual_seed(0))
    print(f"{args.run}: {len(keys_of)} test images, keys/values {tuple(keys.shape[1:])} in {cache.layout.dtype}")
    print("\n| int8 scales | keys: relative error | logits: max abs error | mean abs error | mean abs logit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        reference = model(side, keys, values)
        for name, dims in (("per token of each layer and head", (-1,)), ("per layer and head", (-2, -1))):
            found = model(side, quantized(keys, dims), quantized(values, dims))
            key_error = ((quantized(keys, dims) - keys).norm() / keys.norm()).item()
            error = (found - reference).abs()
            print(
                f"| {name} | {key_error:.2e} | {error.max().item():.2e} | {error.mean().item():.2e} | "
                f"{reference.abs().mean().item():.3f} |"
            )


if __name__ == "__main__":
    main()
