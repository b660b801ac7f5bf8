"""How much the position-embedding resampling changes what FPT+ caches (issue 13): the demo LPM (pre-trained at
256 px, a 16×16 grid) read at 512 px with its embeddings resampled by timm (bicubic, antialiased), "hf" (bicubic
to the grid) and "dino" (DINO's grid + 0.1 scale factor, the official FPT code's), FPT+'s taps (layers 6–11).

    python benchmarks/pos_embed_resampling.py DATA [--images 8]     # DATA: e.g. `fpt synth DATA`

Prints, for each pair, the largest key and value difference over all tokens, the share of heads that keep the
same set of tokens, and the share of kept tokens the two keep alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fpt.config import BackboneSpec
from fpt.data.images import is_image_file, load_image
from fpt.data.transforms import Normalization, lpm_view
from fpt.models.backbone import backbone_mean_std, demo_lpm_directory, load_backbone
from fpt.models.frozen_encoder import FrozenEncoder, LPMFeatures

METHODS = ("timm", "hf", "dino")


def encode(images: torch.Tensor, method: str, token_ratio: float) -> LPMFeatures:
    lpm = load_backbone(BackboneSpec(str(demo_lpm_directory()), pos_embed_resampling=method), input_size=512)
    return FrozenEncoder(lpm, list(range(6, 12)), token_ratio)(images)


def by_position(features: LPMFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, L, H, N, d] in token order (token ratio 1 keeps all, ordered by importance)."""
    order = features.token_indices.argsort(-1).unsqueeze(-1).expand_as(features.keys)
    return features.keys.gather(3, order), features.values.gather(3, order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    files = sorted(path for path in args.data.rglob("*") if is_image_file(path))[: args.images]
    spec = BackboneSpec(str(demo_lpm_directory()))
    view = lpm_view(512, Normalization(*backbone_mean_std(load_backbone(spec, pretrained=False))))
    images = torch.stack([view(load_image(path)) for path in files])
    every = {method: by_position(encode(images, method, 1.0)) for method in METHODS}
    kept = {method: encode(images, method, 0.2).token_indices for method in METHODS}
    for first, second in (("dino", "timm"), ("dino", "hf"), ("hf", "timm")):
        keys = (every[first][0] - every[second][0]).abs().max().item()
        values = (every[first][1] - every[second][1]).abs().max().item()
        a, b = kept[first].flatten(0, 2), kept[second].flatten(0, 2)
        same_set = (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
        shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True)) / a.numel()
        print(
            f"{first} vs {second}: max |Δ keys| {keys:.2e}, max |Δ values| {values:.2e} (mean |key| "
            f"{every[second][0].abs().mean().item():.2f}); heads keeping the same set {same_set:.0%}; "
            f"kept tokens shared {shared:.1%}"
        )


if __name__ == "__main__":
    main()
