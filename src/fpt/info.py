"""What a configured model costs: learnable and frozen parameters, kept tokens, cached bytes per image."""

from __future__ import annotations

from typing import Any

import torch

from fpt.errors import FPTError
from fpt.models.base import TransferModel
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import LPMGeometry, num_important_tokens

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def model_info(model: TransferModel) -> dict[str, Any]:
    """Counts for ``model`` (which must hold its LPM).

    For FPT, ``learnable_ratio`` is learnable / (learnable + frozen), the frozen LPM counted with its own
    classifier head, as in the FPT papers (1.81 % for FPT and 1.03 % for FPT+ on ViT-B/16 at 384 px, 5
    classes). For the baselines it is learnable / all parameters of the adapted model (100 % for full).
    """
    config = model.config
    learnable = model.num_learnable_params()
    if isinstance(model, FPTModel):
        if model.encoder is None:
            raise FPTError(
                f"info counts a model together with its LPM; this {config.method} model has none "
                f"({learnable:,} learnable parameters, nothing frozen)"
            )
        lpm, geometry = model.encoder.model, model.geometry
        frozen = sum(p.numel() for p in lpm.parameters())
        frozen_without_head = frozen - sum(p.numel() for p in lpm.get_classifier().parameters())
    else:
        lpm = model.backbone
        geometry = LPMGeometry.from_model(lpm)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        frozen_without_head = frozen
    info = {
        "method": config.method,
        "backbone": config.backbone.to_dict(),
        "num_classes": config.num_classes,
        "learnable_params": learnable,
        "frozen_params": frozen,
        "frozen_params_without_head": frozen_without_head,
        "learnable_ratio": learnable / (learnable + frozen),
        "lpm": {
            "embed_dim": geometry.embed_dim,
            "num_heads": geometry.num_heads,
            "depth": geometry.depth,
            "patch_size": geometry.patch_size,
            "prefix_tokens": geometry.num_prefix_tokens,
        },
        "lpm_input_size": config.lpm_input_size,
        "lpm_tokens": geometry.num_tokens(config.lpm_input_size),
    }
    if isinstance(model, FPTModel):
        info["side_input_size"] = config.side_input_size
        info["side_width"] = geometry.embed_dim // config.side_width_divisor
    if config.cacheable:
        kept = num_important_tokens(info["lpm_tokens"], config.token_ratio)
        cached_elements = 2 * len(config.tapped_layers) * geometry.num_heads * kept * geometry.head_dim
        info["tapped_layers"] = config.tapped_layers
        info["num_prompts"] = config.num_prompts
        info["tokens_kept_per_layer"] = kept
        info["cached_bytes_per_image"] = {
            str(dtype).removeprefix("torch."): cached_elements * dtype.itemsize for dtype in CACHE_DTYPES
        }
    return info


def format_model_info(info: dict[str, Any]) -> str:
    """A human-readable table of ``model_info``."""
    backbone = info["backbone"]["name"] + (f" ({info['backbone']['weights']})" if info["backbone"]["weights"] else "")
    lpm = info["lpm"]
    frozen = f"{info['frozen_params']:,}"
    if info["frozen_params_without_head"] != info["frozen_params"]:
        frozen += f" ({info['frozen_params_without_head']:,} without LPM head)"
    rows = [
        ("method", info["method"]),
        ("backbone", backbone),
        (
            "LPM",
            f"width {lpm['embed_dim']}, {lpm['num_heads']} heads, {lpm['depth']} layers, patch {lpm['patch_size']}",
        ),
        ("classes", f"{info['num_classes']}"),
        ("learnable parameters", f"{info['learnable_params']:,}"),
        ("frozen parameters", frozen),
        ("learnable ratio", f"{100 * info['learnable_ratio']:.2f} % of all parameters"),
        ("LPM input", f"{info['lpm_input_size']} px, {info['lpm_tokens']} tokens"),
    ]
    if "cached_bytes_per_image" in info:
        cache = ", ".join(f"{dtype} {_megabytes(size)}" for dtype, size in info["cached_bytes_per_image"].items())
        rows += [
            ("tapped layers", ", ".join(map(str, info["tapped_layers"]))),
            ("tokens kept per layer", f"{info['tokens_kept_per_layer']} per head"),
            (
                "side network",
                f"{info['side_input_size']} px, width {info['side_width']}, {info['num_prompts']} prompts",
            ),
            ("cache per image (K+V)", cache),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"
