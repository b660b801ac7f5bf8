"""One training step per method, built the same way for every method so that meters compare fairly.

FPT, FPT+ and the linear probe train from the feature cache: their step holds the trainable modules only, fed
with a batch of cached features (keys/values, or embeddings, in the cache dtype) and side images; the LPM is
not in memory. Their ``/no-cache`` variants run the frozen LPM on the high-resolution images in every step
instead. The baselines run (and
train through) the LPM on the high-resolution images. Every step computes ``model.logits(batch)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fpt.cache import RecordLayout
from fpt.config import BackboneSpec, method_variant
from fpt.data.loaders import Batch
from fpt.models.base import TransferModel
from fpt.models.build import build_model


@dataclass
class TrainingStep:
    """A model, one batch of its inputs and its loss, for ``fpt.bench.memory``'s meters (which take the batch's
    tensors as ``inputs``)."""

    method: str
    model: TransferModel
    batch: Batch

    @property
    def inputs(self) -> list[Tensor]:
        """The batch's model inputs, then its labels."""
        return [*self.batch.inputs(), self.batch.label]

    def loss(self, model: TransferModel, inputs: Sequence[Tensor]) -> Tensor:
        *features, labels = inputs
        return F.cross_entropy(model.logits(self.batch.with_inputs(features)).float(), labels)

    def to(self, device: torch.device) -> None:
        """Move the model and the batch to ``device``."""
        self.model.to(device)
        self.batch = self.batch.to(device)

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
    grad_checkpointing: bool = False,
) -> TrainingStep:
    """The step of ``method`` (a ``METHOD_VARIANTS`` name) for ``backbone`` (random weights) at ``input_size`` px
    and ``batch_size``; ``grad_checkpointing`` applies to the methods with a side network only."""
    config_class, cached = method_variant(method)
    config = config_class(backbone=backbone, num_classes=num_classes, lpm_input_size=input_size)
    model = build_model(config, load_lpm=not cached, pretrained_lpm=False).train()
    model.set_grad_checkpointing(grad_checkpointing and config.side_network)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    index = torch.arange(batch_size)

    def images(size: int) -> Tensor:
        return torch.randn(batch_size, 3, size, size, generator=generator)

    batch = Batch(label=labels, index=index)
    if config.side_network:
        batch.side = images(config.side_input_size)
    if cached:
        layout = model.feature_layout()
        features = {name: torch.randn(batch_size, *shape, generator=generator) for name, shape in layout.items()}
        for name, stored in RecordLayout(layout, str(cache_dtype).removeprefix("torch.")).encode(features).items():
            setattr(batch, name, stored)
    elif config.uses_lpm:
        batch.lpm = images(input_size)
    return TrainingStep(method, model, batch)
