"""One training step per method, built the same way for every method so that meters compare fairly.

FPT and FPT+ train from the feature cache: their step holds the trainable modules only, fed with a
batch of cached keys/values (in the cache dtype) and side images; the LPM is not in memory. Full
fine-tuning and linear probing run the LPM on the high-resolution images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fpt.config import METHOD_CONFIGS
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec, load_backbone
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import LPMGeometry, num_important_tokens

BASELINE_METHODS = ("full", "linear")
STEP_METHODS = (*BASELINE_METHODS, *METHOD_CONFIGS)


@dataclass
class TrainingStep:
    """A model, one batch of its inputs (labels last) and its loss, for ``fpt.bench.memory``'s meters."""

    method: str
    model: nn.Module
    inputs: list[Tensor]

    @staticmethod
    def loss(model: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
        *features, labels = inputs
        return F.cross_entropy(model(*features).float(), labels)

    @property
    def learnable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def training_step(
    method: str,
    backbone: BackboneSpec,
    input_size: int,
    batch_size: int,
    num_classes: int = 5,
    cache_dtype: torch.dtype = torch.float16,
) -> TrainingStep:
    """The step of ``method`` for ``backbone`` (random weights) at ``input_size`` px and ``batch_size``."""
    if method not in STEP_METHODS:
        raise FPTError(f"unknown method '{method}'; choose from {', '.join(STEP_METHODS)}")
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    if method in BASELINE_METHODS:
        model = load_backbone(backbone, pretrained=False).requires_grad_(method == "full")
        model.reset_classifier(num_classes)  # a fresh, trainable head
        model.train()
        images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
        return TrainingStep(method, model, [images, labels])
    config = METHOD_CONFIGS[method](backbone=backbone, num_classes=num_classes, lpm_input_size=input_size)
    with torch.device("meta"):
        geometry = LPMGeometry.from_model(load_backbone(backbone, pretrained=False))
    model = FPTModel(config, geometry).train()
    side = config.side_input_size
    side_images = torch.randn(batch_size, 3, side, side, generator=generator)
    if not config.uses_lpm:
        return TrainingStep(method, model, [side_images, labels])
    kept = num_important_tokens(geometry.num_tokens(input_size), config.token_ratio)
    shape = (batch_size, len(model.config.tapped_layers), geometry.num_heads, kept, geometry.head_dim)
    keys = torch.randn(shape, generator=generator).to(cache_dtype)
    values = torch.randn(shape, generator=generator).to(cache_dtype)
    return TrainingStep(method, model, [side_images, keys, values, labels])
