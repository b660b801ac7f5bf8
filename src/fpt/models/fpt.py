"""FPT / FPT+ models (a frozen LPM, a fusion module with fine-grained prompts, and a side ViT), and the
side-only control (the same side ViT without prompts or LPM)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from fpt.config import FPTConfig, SideNetworkConfig
from fpt.data.loaders import Batch
from fpt.errors import FPTError
from fpt.models.backbone import load_backbone
from fpt.models.base import TransferModel, check_input_size
from fpt.models.frozen_encoder import (
    FrozenEncoder,
    LPMFeatures,
    LPMGeometry,
    TokenSelection,
    validate_tapped_layers,
)
from fpt.models.fusion import FPTFusion, FPTPlusFusion, PromptFusion
from fpt.models.side_vit import SideViT
from fpt.quantization import dequantize

FUSION_MODULES: dict[str, type[PromptFusion]] = {"fpt": FPTFusion, "fpt+": FPTPlusFusion}


def side_network_layers(config: SideNetworkConfig, geometry: LPMGeometry) -> list[int]:
    """The tapped layers of ``config`` resolved against the LPM, after checking that its side network fits it."""
    tapped_layers = config.resolved_tapped_layers(geometry.depth)
    validate_tapped_layers(tapped_layers, geometry.depth)
    if geometry.embed_dim % config.side_width_divisor:
        raise FPTError(
            f"LPM width {geometry.embed_dim} is not divisible by side_width_divisor {config.side_width_divisor}"
        )
    check_input_size("lpm_input_size (--input-size)", config.lpm_input_size, geometry.patch_size)
    check_input_size("side_input_size (--side-input-size)", config.side_input_size, geometry.patch_size)
    return tapped_layers


def side_vit(config: SideNetworkConfig, geometry: LPMGeometry, depth: int) -> SideViT:
    """The side ViT of ``config``: width d / side_width_divisor, the LPM's heads and patch size, ``depth`` blocks."""
    return SideViT(
        img_size=config.side_input_size,
        patch_size=geometry.patch_size,
        embed_dim=geometry.embed_dim // config.side_width_divisor,
        depth=depth,
        num_heads=geometry.num_heads,
        num_classes=config.num_classes,
        attention_init=config.side_attention_init,
    )


def _geometry_of(config: SideNetworkConfig) -> LPMGeometry:
    """The LPM's shape facts, read on the meta device (nothing is loaded or allocated)."""
    with torch.device("meta"):
        return LPMGeometry.from_model(load_backbone(config.backbone, pretrained=False))


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
        tapped_layers = side_network_layers(config, geometry)
        self.config = replace(config, tapped_layers=tapped_layers)
        self.geometry = geometry
        self.fusion = FUSION_MODULES[config.method](
            num_layers=len(tapped_layers),
            num_prompts=config.num_prompts,
            lpm_dim=geometry.embed_dim,
            num_heads=geometry.num_heads,
            side_dim=geometry.embed_dim // config.side_width_divisor,
            dropout=config.prompt_dropout,
        )
        self.side = side_vit(config, geometry, depth=len(tapped_layers))
        self.encoder = encoder

    @classmethod
    def from_config(cls, config: FPTConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> FPTModel:
        if not load_lpm:
            return cls(config, _geometry_of(config))
        backbone = load_backbone(config.backbone, pretrained=pretrained_lpm, input_size=config.lpm_input_size)
        geometry = LPMGeometry.from_model(backbone)
        tapped_layers = config.resolved_tapped_layers(geometry.depth)
        encoder = FrozenEncoder(backbone, tapped_layers, config.token_ratio, config.importance, config.select_registers)
        return cls(config, geometry, encoder)

    def drop_lpm(self) -> None:
        self.encoder = None

    def frozen_lpm(self) -> nn.Module:
        return self._encoder().model

    def feature_layout(self) -> dict[str, tuple[int, ...]]:
        """``keys`` and ``values``, each [L, H, T, d_head]."""
        config = self.config
        shape = self.geometry.feature_shape(
            len(config.tapped_layers), config.lpm_input_size, config.token_ratio, config.select_registers
        )
        return {"keys": shape, "values": shape}

    def feature_settings(self) -> dict[str, Any]:
        config = self.config
        return {
            "lpm_input_size": config.lpm_input_size,
            "tapped_layers": config.tapped_layers,
            "token_ratio": config.token_ratio,
            "importance": config.importance,
            # only where there are registers, so that the caches of LPMs without them stay valid
            **({"select_registers": config.select_registers} if self.geometry.num_register_tokens else {}),
        }

    def preload_features(self, lpm_images: Tensor) -> dict[str, Tensor]:
        features = self.encode(lpm_images)
        return {"keys": features.keys, "values": features.values}

    @contextmanager
    def recording_features(self, lpm: nn.Module) -> Iterator[Callable[[], dict[str, Tensor]]]:
        config = self.config
        selection = TokenSelection(
            tuple(config.tapped_layers), config.token_ratio, config.importance, config.select_registers
        )
        with selection.recording(lpm) as selected:

            def features() -> dict[str, Tensor]:
                latest = selected()
                return {"keys": latest.keys, "values": latest.values}

            yield features

    def encode(self, lpm_images: Tensor) -> LPMFeatures:
        """Run the frozen LPM: high-resolution images [B, C, S, S] -> keys/values [B, L, H, T, d_head]."""
        return self._encoder()(lpm_images)

    def _encoder(self) -> FrozenEncoder:
        if self.encoder is None:
            raise FPTError("this model was built without its LPM (load_lpm=False); it can only use cached features")
        return self.encoder

    def forward(
        self,
        side_images: Tensor,
        keys: Tensor,
        values: Tensor,
        keys_scale: Tensor | None = None,
        values_scale: Tensor | None = None,
    ) -> Tensor:
        """side_images [B, C, s, s], LPM keys/values [B, L, H, T, d_head] (int8 ones with their scales
        [B, L, H, T]) -> logits [B, num_classes]."""
        return self.side(side_images, self.fusion(keys, values, keys_scale, values_scale))

    def classifier(self) -> nn.Linear:
        return self.side.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.side.grad_checkpointing = enable

    def forward_images(self, lpm_images: Tensor, side_images: Tensor) -> Tensor:
        """Logits [B, num_classes] straight from the two views, running the LPM on the fly."""
        features = self.encode(lpm_images)
        return self(side_images, features.keys, features.values)

    def logits(self, batch: Batch) -> Tensor:
        """From the cached keys/values when the batch has them, else by running the LPM on its ``lpm`` view."""
        if batch.keys is not None and batch.values is not None:
            return self(batch.side, batch.keys, batch.values, batch.keys_scale, batch.values_scale)
        if batch.lpm is None:
            raise FPTError(f"{self.config.method} needs the LPM's keys and values, or the high-resolution view")
        return self.forward_images(batch.lpm, batch.side)

    @torch.no_grad()
    def diagnostics(self, batch: Batch) -> dict[str, float]:
        """Per tapped layer: how alike its prompts are (mean cosine similarity) and how spread their attention
        over the cached tokens is (entropy / log T), on ``batch``'s keys (or its LPM view, run through the LPM)."""
        keys = dequantize(batch.keys, batch.keys_scale) if batch.keys is not None else self.encode(batch.lpm).keys
        similarity, entropy = self.fusion.prompt_similarity(), self.fusion.attention_entropy(keys)
        readings = {}
        for index, layer in enumerate(self.config.tapped_layers):
            readings[f"prompt_similarity/layer{layer}"] = similarity[index].item()
            readings[f"attention_entropy/layer{layer}"] = entropy[index].item()
        return readings

    def frozen_params(self) -> tuple[int, int]:
        if self.encoder is None:
            raise FPTError(
                f"this {self.config.method} model was built without its LPM (load_lpm=False), so its frozen "
                f"parameters are unknown ({self.num_learnable_params():,} learnable)"
            )
        lpm = self.encoder.model
        frozen = sum(p.numel() for p in lpm.parameters())
        return frozen, frozen - sum(p.numel() for p in lpm.get_classifier().parameters())


class SideOnlyModel(TransferModel):
    """The side-only control: FPT+'s side ViT alone on the down-sampled view, with no prompts and no LPM.

    Args:
        config: its config; the side network is sized from the LPM's geometry exactly as FPT+'s is.
        geometry: the LPM's width, heads, depth and patch size (the LPM itself is never loaded).
    """

    def __init__(self, config: SideNetworkConfig, geometry: LPMGeometry) -> None:
        super().__init__()
        tapped_layers = side_network_layers(config, geometry)
        self.config = replace(config, tapped_layers=tapped_layers)
        self.side = side_vit(config, geometry, depth=len(tapped_layers))
        self.geometry = geometry

    @classmethod
    def from_config(
        cls, config: SideNetworkConfig, load_lpm: bool = True, pretrained_lpm: bool = True
    ) -> SideOnlyModel:
        """Only the LPM's geometry is read, whatever ``load_lpm`` and ``pretrained_lpm`` say."""
        return cls(config, _geometry_of(config))

    def forward(self, side_images: Tensor) -> Tensor:
        """side_images [B, C, s, s] -> logits [B, num_classes]."""
        return self.side(side_images)

    def classifier(self) -> nn.Linear:
        return self.side.head

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.side.grad_checkpointing = enable

    def logits(self, batch: Batch) -> Tensor:
        return self(batch.side)

    def frozen_params(self) -> tuple[int, int]:
        return 0, 0
