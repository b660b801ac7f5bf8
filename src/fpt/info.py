"""What a configuration costs (``fpt info``): learnable and frozen parameters, kept tokens, cached bytes per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fpt.cache import CACHE_DTYPES, RecordLayout
from fpt.config import FPTConfig
from fpt.models.base import TransferModel
from fpt.models.frozen_encoder import LPMGeometry
from fpt.render import mib


@dataclass
class ModelInfo:
    """Counts of one model. The side-network fields are set for FPT, FPT+ and side-only, the prompt and cache
    fields for the methods that train from cached LPM features (FPT, FPT+); otherwise they are None."""

    method: str
    backbone: dict[str, Any]
    num_classes: int
    learnable_params: int
    frozen_params: int
    frozen_params_without_head: int
    learnable_ratio: float
    lpm: LPMGeometry
    lpm_input_size: int
    lpm_tokens: int
    side_input_size: int | None = None
    side_width: int | None = None
    tapped_layers: list[int] | None = None
    num_prompts: int | None = None
    tokens_kept_per_layer: int | None = None
    cached_bytes_per_image: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values; unset optional fields are left out."""
        data = {name: value for name, value in vars(self).items() if value is not None}
        geometry = self.lpm
        data["lpm"] = {
            "embed_dim": geometry.embed_dim,
            "num_heads": geometry.num_heads,
            "depth": geometry.depth,
            "patch_size": geometry.patch_size,
            "prefix_tokens": geometry.num_prefix_tokens,
        }
        return data


def model_info(model: TransferModel) -> ModelInfo:
    """Counts for ``model`` (which must hold its LPM, unless the method has none).

    For FPT, ``learnable_ratio`` is learnable / (learnable + frozen), the frozen LPM counted with its own
    classifier head, as in the FPT papers (1.81 % for FPT and 1.03 % for FPT+ on ViT-B/16 at 384 px, 5
    classes). For the baselines it is learnable / all parameters of the adapted model (100 % for full); the
    side-only control holds no LPM, so all of its parameters are learnable.
    """
    config, geometry = model.config, model.geometry
    learnable = model.num_learnable_params()
    frozen, frozen_without_head = model.frozen_params()
    info = ModelInfo(
        method=config.method,
        backbone=config.backbone.to_dict(),
        num_classes=config.num_classes,
        learnable_params=learnable,
        frozen_params=frozen,
        frozen_params_without_head=frozen_without_head,
        learnable_ratio=learnable / (learnable + frozen),
        lpm=geometry,
        lpm_input_size=config.lpm_input_size,
        lpm_tokens=geometry.num_tokens(config.lpm_input_size),
    )
    if config.side_network:
        info.side_input_size = config.side_input_size
        info.side_width = geometry.embed_dim // config.side_width_divisor
        info.tapped_layers = config.tapped_layers
    if config.cacheable:
        layout = model.feature_layout()
        info.cached_bytes_per_image = {name: RecordLayout(layout, name).nbytes for name in CACHE_DTYPES}
    if isinstance(config, FPTConfig):
        info.num_prompts = config.num_prompts
        info.tokens_kept_per_layer = model.feature_layout()["keys"][2]
    return info


def format_model_info(info: ModelInfo) -> str:
    """A human-readable table of ``model_info``."""
    backbone = info.backbone["name"] + (f" ({info.backbone['weights']})" if info.backbone["weights"] else "")
    lpm = info.lpm
    frozen = f"{info.frozen_params:,}"
    if info.frozen_params_without_head != info.frozen_params:
        frozen += f" ({info.frozen_params_without_head:,} without LPM head)"
    rows = [
        ("method", info.method),
        ("backbone", backbone),
        ("LPM", f"width {lpm.embed_dim}, {lpm.num_heads} heads, {lpm.depth} layers, patch {lpm.patch_size}"),
        ("classes", f"{info.num_classes}"),
        ("learnable parameters", f"{info.learnable_params:,}"),
        ("frozen parameters", frozen),
        ("learnable ratio", f"{100 * info.learnable_ratio:.2f} % of all parameters"),
        ("LPM input", f"{info.lpm_input_size} px, {info.lpm_tokens} tokens"),
    ]
    if info.tapped_layers is not None:
        rows.append(("tapped layers", ", ".join(map(str, info.tapped_layers))))
    if info.tokens_kept_per_layer is not None:
        rows.append(("tokens kept per layer", f"{info.tokens_kept_per_layer} per head"))
    if info.side_input_size is not None:
        prompts = f", {info.num_prompts} prompts" if info.num_prompts is not None else ", no prompts"
        rows.append(("side network", f"{info.side_input_size} px, width {info.side_width}{prompts}"))
    if info.cached_bytes_per_image is not None:
        cache = ", ".join(f"{dtype} {mib(size, decimals=2)}" for dtype, size in info.cached_bytes_per_image.items())
        rows.append(("cache per image (K+V)", cache))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
