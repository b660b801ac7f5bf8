"""One training step per method, built the same way for every method so that meters compare fairly.

FPT and FPT+ train from the feature cache: their step holds the trainable modules only, fed with a batch
of cached keys/values (in the cache dtype) and side images; the LPM is not in memory. Their ``/no-cache``
variants run the frozen LPM on the high-resolution images in every step instead. The baselines run (and
train through) the LPM on the high-resolution images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fpt.config import METHOD_CONFIGS
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from fpt.models.base import TransferModel
from fpt.models.build import build_model
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import num_important_tokens

NO_CACHE = "/no-cache"
STEP_METHODS = (*METHOD_CONFIGS, *(f"{m}{NO_CACHE}" for m, c in METHOD_CONFIGS.items() if c.cacheable))


@dataclass
class TrainingStep:
    """A model, one batch of its inputs (labels last) and its loss, for ``fpt.bench.memory``'s meters.

    ``runs_lpm_forward``: an FPT model without cache, whose inputs are the LPM and side images.
    """

    method: str
    model: TransferModel
    inputs: list[Tensor]
    runs_lpm_forward: bool = False

    def loss(self, model: TransferModel, inputs: Sequence[Tensor]) -> Tensor:
        *features, labels = inputs
        logits = model.forward_images(*features) if self.runs_lpm_forward else model(*features)
        return F.cross_entropy(logits.float(), labels)

    @property
    def learnable_params(self) -> int:
        return self.model.num_learnable_params()


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
    runs_lpm_forward = method.endswith(NO_CACHE)
    config = METHOD_CONFIGS[method.removesuffix(NO_CACHE)](
        backbone=backbone, num_classes=num_classes, lpm_input_size=input_size
    )
    model = build_model(config, load_lpm=runs_lpm_forward, pretrained_lpm=False).train()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)

    def images(size: int) -> Tensor:
        return torch.randn(batch_size, 3, size, size, generator=generator)

    if not isinstance(model, FPTModel):
        return TrainingStep(method, model, [images(input_size), labels])
    side_images = images(config.side_input_size)
    if runs_lpm_forward:
        return TrainingStep(method, model, [images(input_size), side_images, labels], runs_lpm_forward=True)
    if not config.uses_lpm:
        return TrainingStep(method, model, [side_images, labels])
    geometry = model.geometry
    kept = num_important_tokens(geometry.num_tokens(input_size), config.token_ratio)
    shape = (batch_size, len(model.config.tapped_layers), geometry.num_heads, kept, geometry.head_dim)
    keys = torch.randn(shape, generator=generator).to(cache_dtype)
    values = torch.randn(shape, generator=generator).to(cache_dtype)
    return TrainingStep(method, model, [side_images, keys, values, labels])
