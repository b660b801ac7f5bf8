"""Shared test helpers and fixtures.

``randomize_`` gives a module non-trivial parameters; ``make_tiny_vit`` builds a small randomised timm ViT that
runs at any input size; ``explicit_layer_norm`` is LayerNorm written out for reference computations. The
fixtures save a tiny ViT backbone to a local file, so loading code runs for real without a download.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from fpt.models.backbone import BackboneSpec

TINY_ARCH = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial random value, in place; returns ``module``.

    The noise is drawn in float64 (one draw per parameter, in ``named_parameters`` order) and cast to the
    parameter's dtype. Prompts (names ending in ``prompts``) get unit-scale noise, far from zero; weights of
    two or more dimensions that are not tokens or position embeddings get fan-in scaled noise
    ``1.5 * noise / sqrt(fan_in)``; LayerNorm weights get ``1 + 0.5 * noise`` (non-identity); everything else
    (biases, CLS/register tokens, position embeddings, layer scales) gets ``0.5 * noise`` (non-zero).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype)
            is_embedding = "token" in name or "pos_embed" in name or "position_embedding" in name
            if name.endswith("prompts"):
                param.copy_(noise)
            elif param.ndim >= 2 and not is_embedding:
                param.copy_(1.5 * noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.5 * noise)
            else:
                param.copy_(0.5 * noise)
    return module


def make_tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> VisionTransformer:
    """A randomised timm ViT (by default 32 px, patch 8, 64 wide, 4 layers, 4 heads, 3 classes, any input size).

    ``kwargs`` override the ``VisionTransformer`` arguments; the model is cast to ``dtype`` before it is
    randomised, so float64 models get float64 noise. The model is left in training mode, as timm builds it.
    """
    options = {**TINY_KWARGS, "num_classes": 3, "qkv_bias": True, "dynamic_img_size": True, **kwargs}
    return randomize_(VisionTransformer(**options).to(dtype), seed=seed)


def explicit_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension, written out: biased variance, ``eps`` inside the square root."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


@pytest.fixture(scope="session")
def tiny_vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny timm ViT (64 wide, 4 layers, 4 heads, patch 8, 10-class head) saved as .safetensors."""
    model = randomize_(timm.create_model(TINY_ARCH, num_classes=10, **TINY_KWARGS))
    path = tmp_path_factory.mktemp("tiny_vit") / "tiny_vit.safetensors"
    save_file(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_spec(tiny_vit_file: Path) -> BackboneSpec:
    return BackboneSpec(TINY_ARCH, weights=str(tiny_vit_file), model_kwargs=dict(TINY_KWARGS))
