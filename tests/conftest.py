"""Shared fixtures: tiny ViT backbones saved to local files, so loading code runs for real without a download."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fpt.models.backbone import BackboneSpec

TINY_ARCH = "vit_tiny_patch16_224"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}


def randomize_(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (non-zero biases, non-identity norms)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


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
