"""Baselines that adapt the LPM itself at the high resolution: full fine-tuning, VPT-deep, LoRA and adapter
tuning (the linear probe, which reads preloaded embeddings, is ``fpt.models.linear_probe``).

Each is the timm ViT with a new classifier head; the parameter-efficient ones add their own small modules
and freeze every pre-trained weight. They read the high-resolution image directly (nothing is cached, since
their LPM is trained through), so the training loop augments that view as it augments the side view of FPT.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fpt.config import AdapterConfig, LoRAConfig, MethodConfig, VPTDeepConfig
from fpt.data.loaders import Batch
from fpt.errors import FPTError
from fpt.models.backbone import load_backbone
from fpt.models.base import TransferModel, check_input_size
from fpt.models.frozen_encoder import LPMGeometry
from fpt.models.lpm_attention import LPM


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) · dropout(x) Aᵀ Bᵀ`` around a frozen linear layer.

    A [rank, in] is Kaiming-uniform, B [out, rank] starts at zero, so the layer starts as ``base``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


class MLPWithAdapter(nn.Module):
    """A block's MLP followed by a bottleneck adapter: ``h + up(GELU(down(h)))`` with ``h = mlp(x)``.

    ``up`` starts at zero, so the block starts as the pre-trained one.
    """

    def __init__(self, mlp: nn.Module, dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        weight = next(mlp.parameters())
        self.mlp = mlp
        self.down = nn.Linear(dim, bottleneck_dim, device=weight.device, dtype=weight.dtype)
        self.up = nn.Linear(bottleneck_dim, dim, device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, d] -> [B, N, d]."""
        hidden = self.mlp(x)
        return hidden + self.up(F.gelu(self.down(hidden)))


class BaselineViT(TransferModel):
    """The LPM with a new head, adapted by one of ``BASELINE_METHODS`` (chosen by the config's method).

    Args:
        config: a baseline method's config.
        backbone: the pre-trained LPM (timm ViT or Eva); it is modified in place.
    """

    def __init__(self, config: MethodConfig, backbone: LPM) -> None:
        super().__init__()
        if config.method not in BASELINE_METHODS:
            raise FPTError(f"'{config.method}' is not a baseline; expected one of {', '.join(BASELINE_METHODS)}")
        if config.method in ("lora", "vpt-deep") and not isinstance(backbone, VisionTransformer):
            raise FPTError(
                f"--method {config.method} adapts timm VisionTransformer backbones; '{config.backbone.name}' is a "
                f"{type(backbone).__name__} (rotary position embeddings): use full, adapter, linear, fpt or fpt+"
            )
        self.geometry = LPMGeometry.from_model(backbone)
        check_input_size("lpm_input_size (--input-size)", config.lpm_input_size, self.geometry.patch_size)
        self.config = config
        backbone.requires_grad_(config.trains_lpm)
        backbone.reset_classifier(config.num_classes)  # new, trainable
        self.backbone = backbone
        self.prompts: nn.Parameter | None = None
        BASELINE_METHODS[config.method](self, config)

    @classmethod
    def from_config(cls, config: MethodConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> BaselineViT:
        """The baseline of ``config`` (always with its LPM, which it trains through), with the LPM's pre-trained
        weights unless ``pretrained_lpm`` is False."""
        return cls(config, load_backbone(config.backbone, pretrained=pretrained_lpm, input_size=config.lpm_input_size))

    def forward(self, images: Tensor) -> Tensor:
        """High-resolution images [B, C, S, S] -> logits [B, num_classes]."""
        if self.prompts is None:
            return self.backbone(images)
        return self.backbone.forward_head(self.backbone.norm(self._blocks_with_prompts(images)))

    def logits(self, batch: Batch) -> Tensor:
        return self(batch.lpm)

    def classifier(self) -> nn.Linear:
        return self.backbone.head

    def frozen_params(self) -> tuple[int, int]:
        frozen = sum(p.numel() for p in self.parameters() if not p.requires_grad)
        return frozen, frozen

    def _blocks_with_prompts(self, images: Tensor) -> Tensor:
        """VPT-deep: block i reads [prefix tokens, prompts_i, patch tokens]; its prompt outputs are replaced by
        prompts_{i+1}, and the last block's are dropped. -> tokens [B, N, d]."""
        vit = self.backbone
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        prefix, num_prompts = vit.num_prefix_tokens, self.prompts.shape[1]
        patches = x[:, prefix:]
        for block, prompts in zip(vit.blocks, self.prompts, strict=True):
            prompts = self.prompt_dropout(prompts.expand(x.shape[0], -1, -1))  # a mask per image
            x = block(torch.cat([x[:, :prefix], prompts, patches], dim=1))
            patches = x[:, prefix + num_prompts :]
        return torch.cat([x[:, :prefix], patches], dim=1)


def _add_lora(model: BaselineViT, config: LoRAConfig) -> None:
    for block in model.backbone.blocks:
        block.attn.qkv = LoRALinear(block.attn.qkv, config.rank, config.alpha, config.dropout)


def _add_adapters(model: BaselineViT, config: AdapterConfig) -> None:
    for block in model.backbone.blocks:
        block.mlp = MLPWithAdapter(block.mlp, model.backbone.embed_dim, config.bottleneck_dim)


def _add_deep_prompts(model: BaselineViT, config: VPTDeepConfig) -> None:
    backbone = model.backbone
    depth, dim = len(backbone.blocks), backbone.embed_dim
    weight = backbone.patch_embed.proj.weight
    model.prompts = nn.Parameter(torch.empty(depth, config.num_prompts, dim, device=weight.device, dtype=weight.dtype))
    patch_area = math.prod(backbone.patch_embed.patch_size)
    bound = math.sqrt(6.0 / (3 * patch_area + dim))  # VPT's Xavier-uniform over a patch
    nn.init.uniform_(model.prompts, -bound, bound)
    model.prompt_dropout = nn.Dropout(config.prompt_dropout)


def _head_only(model: BaselineViT, config: MethodConfig) -> None:
    """Full fine-tuning adds nothing: every weight and the new head are trained."""


# each baseline method and how it adapts the LPM (after the new head; the pre-trained weights frozen unless full)
BASELINE_METHODS: dict[str, Callable[[BaselineViT, Any], None]] = {
    "full": _head_only,
    "vpt-deep": _add_deep_prompts,
    "lora": _add_lora,
    "adapter": _add_adapters,
}
