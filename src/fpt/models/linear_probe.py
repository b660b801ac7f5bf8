"""The linear probe: a linear classifier on one pooled embedding per image from the frozen LPM.

This is what most medical-imaging teams reach for first (pathology pipelines work this way): the LPM is
frozen and its input never augmented, so each image's embedding is computed once (``fpt preload``) and
training reads a few KB per image instead of running the LPM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from fpt.config import LinearProbeConfig, Pooling
from fpt.data.loaders import Batch
from fpt.errors import FPTError
from fpt.models.backbone import load_backbone
from fpt.models.base import TransferModel, check_input_size
from fpt.models.frozen_encoder import LPMGeometry
from fpt.models.lpm_attention import LPM, has_class_token
from fpt.quantization import dequantize

# fpt 0.1.0 trained the LPM's own head (on its CLS token) and saved it under these names
LEGACY_HEAD_PREFIX = "backbone.head."


def embedding_dim(geometry: LPMGeometry, pooling: Pooling) -> int:
    """Width of the pooled embedding: the LPM's, or twice it for "cls+mean"."""
    return geometry.embed_dim * (2 if pooling == "cls+mean" else 1)


def check_pooling(lpm: LPM, pooling: Pooling) -> None:
    """Raise unless the LPM has the tokens ``pooling`` reads."""
    if "cls" in pooling and not has_class_token(lpm):
        raise FPTError(f"pooling '{pooling}' needs a CLS token, and this backbone has none; use --pooling mean")


class PooledEncoder(nn.Module):
    """A frozen LPM that returns one embedding per image from its final normalised tokens.

    Args:
        model: the LPM (built with ``dynamic_img_size=True``).
        pooling: "cls" (the CLS token), "mean" (the mean of the patch tokens) or "cls+mean" (both, concatenated).
    """

    def __init__(self, model: LPM, pooling: Pooling) -> None:
        super().__init__()
        check_pooling(model, pooling)
        self.model = model.requires_grad_(False)
        self.pooling = pooling
        self.train(False)

    def train(self, mode: bool = True) -> PooledEncoder:
        """The LPM always stays in eval mode (no dropout, no drop-path)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, C, S, S] -> embeddings [B, D] (D = d, or 2d for "cls+mean")."""
        return pool_tokens(self.model.forward_features(images), self.pooling, self.model.num_prefix_tokens)


def pool_tokens(tokens: Tensor, pooling: Pooling, num_prefix_tokens: int) -> Tensor:
    """The LPM's final normalised tokens [B, N, d] -> embeddings [B, D] (D = d, or 2d for "cls+mean")."""
    pooled = []
    if "cls" in pooling:
        pooled.append(tokens[:, 0])
    if "mean" in pooling:
        pooled.append(tokens[:, num_prefix_tokens:].mean(dim=1))
    return torch.cat(pooled, dim=-1)


class EmbeddingStandardizer(nn.Module):
    """Standardises each embedding dimension with the mean and variance of every embedding seen in training.

    In training mode each batch first joins the statistics (an exact running mean and variance, merged batch by
    batch, so after one epoch they are the training set's), then is standardised with them; in eval mode the
    statistics are only read. They are buffers, saved with the trained weights.

    Args:
        dim: the embedding width D.
        eps: added to the variance.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sum_squares", torch.zeros(dim))  # of the deviations from the mean

    @torch.no_grad()
    def _update(self, embeddings: Tensor) -> None:
        """Merge a batch into the statistics; under torchrun, every rank's share of the step's global batch, in
        rank order (so every rank holds the statistics one process would)."""
        batch = embeddings.float()
        batch_mean = batch.mean(dim=0) if len(batch) else torch.zeros_like(self.mean)
        moments = torch.cat([batch.new_tensor([len(batch)]), batch_mean, (batch - batch_mean).square().sum(dim=0)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shares = [torch.empty_like(moments) for _ in range(dist.get_world_size())]
            dist.all_gather(shares, moments)
        else:
            shares = [moments]
        for count, share_mean, share_squares in (share.split([1, len(self.mean), len(self.mean)]) for share in shares):
            delta = share_mean - self.mean
            total = self.count + count[0]
            merged = total.clamp(min=1.0)  # an empty share adds nothing (and no host sync asks whether it is empty)
            self.sum_squares += share_squares + delta.square() * self.count * count[0] / merged
            self.mean += delta * count[0] / merged
            self.count.copy_(total)

    def forward(self, embeddings: Tensor) -> Tensor:
        """embeddings [B, D] -> standardised embeddings [B, D] (same dtype)."""
        if self.training:
            self._update(embeddings)
        variance = self.sum_squares / self.count.clamp(min=1.0)
        scale = (variance + self.eps).rsqrt().to(embeddings.dtype)
        return (embeddings - self.mean.to(embeddings.dtype)) * scale


class LinearProbeModel(TransferModel):
    """A linear head on pooled LPM embeddings, standardised first (``feature_norm``); only ``head`` is trained.

    Args:
        config: its config.
        geometry: the LPM's width, heads, depth and patch size.
        encoder: the frozen LPM; None when training only from preloaded embeddings.
    """

    def __init__(self, config: LinearProbeConfig, geometry: LPMGeometry, encoder: PooledEncoder | None = None) -> None:
        super().__init__()
        check_input_size("lpm_input_size (--input-size)", config.lpm_input_size, geometry.patch_size)
        self.config = config
        self.geometry = geometry
        self.encoder = encoder
        dim = embedding_dim(geometry, config.pooling)
        self.norm = EmbeddingStandardizer(dim) if config.feature_norm == "standardize" else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes)
        nn.init.zeros_(self.head.weight)  # logistic regression from zero: every class equally likely at first
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(
        cls, config: LinearProbeConfig, load_lpm: bool = True, pretrained_lpm: bool = True
    ) -> LinearProbeModel:
        if not load_lpm:
            with torch.device("meta"):
                geometry = LPMGeometry.from_model(load_backbone(config.backbone, pretrained=False))
            return cls(config, geometry)
        backbone = load_backbone(config.backbone, pretrained=pretrained_lpm, input_size=config.lpm_input_size)
        return cls(config, LPMGeometry.from_model(backbone), PooledEncoder(backbone, config.pooling))

    def forward(self, embeddings: Tensor) -> Tensor:
        """embeddings [B, D] (in the cache dtype, or the LPM's) -> logits [B, num_classes]."""
        return self.head(self.norm(embeddings.to(self.head.weight.dtype)))

    def classifier(self) -> nn.Linear:
        return self.head

    def join_empty_step(self) -> None:
        """The standardiser's statistics merge every rank's share of each training step."""
        if self.training and isinstance(self.norm, EmbeddingStandardizer):
            self.norm._update(self.head.weight.new_zeros(0, self.head.in_features))

    def logits(self, batch: Batch) -> Tensor:
        """From the preloaded embeddings when the batch has them, else by running the LPM on its ``lpm`` view."""
        if batch.embedding is not None:
            return self(dequantize(batch.embedding, batch.embedding_scale, self.head.weight.dtype))
        if batch.lpm is None:
            raise FPTError("linear needs the LPM's preloaded embeddings, or the high-resolution view")
        return self(self._encoder()(batch.lpm))

    def feature_layout(self) -> dict[str, tuple[int, ...]]:
        """``embedding`` [D]."""
        return {"embedding": (embedding_dim(self.geometry, self.config.pooling),)}

    def feature_settings(self) -> dict[str, Any]:
        return {"lpm_input_size": self.config.lpm_input_size, "pooling": self.config.pooling}

    def preload_features(self, lpm_images: Tensor) -> dict[str, Tensor]:
        return {"embedding": self._encoder()(lpm_images)}

    @contextmanager
    def recording_features(self, lpm: nn.Module) -> Iterator[Callable[[], dict[str, Tensor]]]:
        check_pooling(lpm, self.config.pooling)
        latest: list[Tensor] = []

        def record(norm: nn.Module, inputs: tuple[Tensor], tokens: Tensor) -> None:
            latest[:] = [pool_tokens(tokens, self.config.pooling, lpm.num_prefix_tokens)]

        hook = lpm.norm.register_forward_hook(record)  # forward_features ends with the final norm
        try:
            yield lambda: {"embedding": latest[0]}
        finally:
            hook.remove()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The head's parameters and the standardisation's statistics (learned from the training data too)."""
        statistics = {f"norm.{name}": buffer.detach() for name, buffer in self.norm.named_buffers()}
        return {**super().trainable_state_dict(), **statistics}

    def frozen_lpm(self) -> nn.Module:
        return self._encoder().model

    def drop_lpm(self) -> None:
        self.encoder = None

    def frozen_params(self) -> tuple[int, int]:
        lpm = self.frozen_lpm()
        frozen = sum(p.numel() for p in lpm.parameters())
        return frozen, frozen - sum(p.numel() for p in lpm.get_classifier().parameters())

    def load_trainable_weights(self, path: str | Path) -> None:
        """As ``TransferModel``'s; also reads the head of a linear probe saved by fpt 0.1.0."""
        legacy_head = _legacy_head(Path(path))
        if legacy_head is None:
            super().load_trainable_weights(path)
            return
        try:
            self.head.load_state_dict(legacy_head)
        except RuntimeError as error:
            raise FPTError(f"{path} does not match its config.json: {str(error).splitlines()[-1].strip()}") from None

    def _encoder(self) -> PooledEncoder:
        if self.encoder is None:
            raise FPTError("this model was built without its LPM (load_lpm=False); it can only use cached features")
        return self.encoder


def _legacy_head(path: Path) -> dict[str, Tensor] | None:
    """The head weights of an fpt 0.1.0 linear probe at ``path``; None for any other (or unreadable) file."""
    try:
        with safe_open(path, framework="pt") as handle:  # only the names, unless they are the old ones
            names = [name for name in handle.keys() if name.startswith(LEGACY_HEAD_PREFIX)]  # noqa: SIM118
            return {name.removeprefix(LEGACY_HEAD_PREFIX): handle.get_tensor(name) for name in names} or None
    except (OSError, SafetensorError):
        return None
