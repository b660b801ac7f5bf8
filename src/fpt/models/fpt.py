"""FPT / FPT+ models: a frozen LPM, a fusion module with fine-grained prompts, and a side ViT."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fpt.config import FPTConfig
from fpt.errors import FPTError
from fpt.models.backbone import load_backbone
from fpt.models.base import TransferModel, check_input_size
from fpt.models.frozen_encoder import FrozenEncoder, LPMFeatures, LPMGeometry, validate_tapped_layers
from fpt.models.fusion import FPTFusion, FPTPlusFusion, PromptFusion
from fpt.models.side_vit import SideViT

FUSION_MODULES: dict[str, type[PromptFusion]] = {"fpt": FPTFusion, "fpt+": FPTPlusFusion}


class FPTModel(TransferModel):
    """Fine-grained prompt tuning: only ``fusion`` and ``side`` are trained.

    Args:
        config: the method's config; its tapped layers are resolved against the LPM's depth.
        geometry: the LPM's width, heads, depth and patch size.
        encoder: the frozen LPM; None when training only from cached keys/values (the LPM is then
            never loaded, which is the point of preloading).
    """

    def __init__(self, config: FPTConfig, geometry: LPMGeometry, encoder: FrozenEncoder | None = None) -> None:
        super().__init__()
        tapped_layers = config.resolved_tapped_layers(geometry.depth)
        validate_tapped_layers(tapped_layers, geometry.depth)
        if geometry.embed_dim % config.side_width_divisor:
            raise FPTError(
                f"LPM width {geometry.embed_dim} is not divisible by side_width_divisor {config.side_width_divisor}"
            )
        check_input_size("lpm_input_size (--input-size)", config.lpm_input_size, geometry.patch_size)
        check_input_size("side_input_size (--side-input-size)", config.side_input_size, geometry.patch_size)
        side_dim = geometry.embed_dim // config.side_width_divisor
        self.config = replace(config, tapped_layers=tapped_layers)
        self.geometry = geometry
        self.fusion = (
            FUSION_MODULES[config.method](
                num_layers=len(tapped_layers),
                num_prompts=config.num_prompts,
                lpm_dim=geometry.embed_dim,
                num_heads=geometry.num_heads,
                side_dim=side_dim,
                dropout=config.prompt_dropout,
            )
            if config.uses_lpm
            else None
        )
        self.side = SideViT(
            img_size=config.side_input_size,
            patch_size=geometry.patch_size,
            embed_dim=side_dim,
            depth=len(tapped_layers),
            num_heads=geometry.num_heads,
            num_classes=config.num_classes,
        )
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: FPTConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> FPTModel:
        """Build the model of ``config``.

        Args:
            load_lpm: build the frozen LPM; False reads only its geometry (for training from a cache).
            pretrained_lpm: load the LPM's pre-trained weights; False keeps a random init (for counting).
        """
        if not load_lpm or not config.uses_lpm:
            with torch.device("meta"):
                geometry = LPMGeometry.from_model(load_backbone(config.backbone, pretrained=False))
            return cls(config, geometry)
        backbone = load_backbone(config.backbone, pretrained=pretrained_lpm)
        geometry = LPMGeometry.from_model(backbone)
        tapped_layers = config.resolved_tapped_layers(geometry.depth)
        encoder = FrozenEncoder(backbone, tapped_layers, config.token_ratio, config.importance)
        return cls(config, geometry, encoder)

    def encode(self, lpm_images: Tensor) -> LPMFeatures:
        """Run the frozen LPM: high-resolution images [B, C, S, S] -> keys/values [B, L, H, T, d_head]."""
        if self.encoder is None:
            raise FPTError("this model was built without its LPM (load_lpm=False); it can only use cached features")
        return self.encoder(lpm_images)

    def forward(self, side_images: Tensor, keys: Tensor | None = None, values: Tensor | None = None) -> Tensor:
        """side_images [B, C, s, s], LPM keys/values [B, L, H, T, d_head] -> logits [B, num_classes].

        The side-only control takes no keys/values.
        """
        if self.fusion is None:
            return self.side(side_images)
        if keys is None or values is None:
            raise FPTError(f"{self.config.method} needs the LPM's keys and values")
        return self.side(side_images, self.fusion(keys, values))

    def forward_images(self, lpm_images: Tensor, side_images: Tensor) -> Tensor:
        """Logits [B, num_classes] straight from the two views, running the LPM on the fly."""
        if self.fusion is None:
            return self.side(side_images)
        features = self.encode(lpm_images)
        return self(side_images, features.keys, features.values)
