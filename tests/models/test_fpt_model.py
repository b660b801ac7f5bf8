"""FPTModel end to end on a tiny timm ViT: the composition, where gradients go, and what is counted as learnable."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fpt.config import FPTConfig, FPTPlusConfig
from fpt.errors import FPTError
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import FrozenEncoder, LPMGeometry
from fpt.models.fusion import FPTFusion, FPTPlusFusion
from tests.conftest import make_tiny_vit, randomize_

EMBED_DIM, NUM_HEADS, DEPTH, PATCH = 64, 4, 4, 8  # side width 64 / 8 = 8, divisible by the 4 heads
TAPPED = [2, 3]


def make_encoder(seed: int = 0) -> FrozenEncoder:
    lpm = make_tiny_vit(seed, patch_size=PATCH, embed_dim=EMBED_DIM, depth=DEPTH, num_heads=NUM_HEADS)
    return FrozenEncoder(lpm, tapped_layers=TAPPED, token_ratio=0.3)


def make_model(config_class: type[FPTConfig], seed: int = 0) -> FPTModel:
    encoder = make_encoder(seed)
    config = config_class(
        backbone="unused", num_classes=3, lpm_input_size=32, side_input_size=16, tapped_layers=list(TAPPED)
    )
    model = FPTModel(config, LPMGeometry.from_model(encoder.model), encoder)
    randomize_(model.fusion, seed=seed + 1)
    randomize_(model.side, seed=seed + 2)
    return model


def views(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=generator), torch.randn(2, 3, 16, 16, generator=generator)


@pytest.mark.parametrize(("config_class", "fusion_class"), [(FPTConfig, FPTFusion), (FPTPlusConfig, FPTPlusFusion)])
def test_model_is_sized_from_the_lpm_geometry(config_class, fusion_class):
    model = make_model(config_class)
    assert isinstance(model.fusion, fusion_class)
    assert model.config.tapped_layers == TAPPED
    side_dim = EMBED_DIM // 8
    prompt_dim = side_dim if config_class is FPTConfig else EMBED_DIM
    assert model.fusion.prompts.shape == (len(TAPPED), model.config.num_prompts, prompt_dim)
    assert model.fusion.out_proj.out_features == side_dim
    assert len(model.side.blocks) == len(TAPPED)
    assert model.side.blocks[0].attn.num_heads == NUM_HEADS
    assert model.side.cls_token.shape[-1] == side_dim
    assert model.side.pos_embed.shape[1] == 1 + (16 // PATCH) ** 2


@pytest.mark.parametrize("config_class", [FPTConfig, FPTPlusConfig])
def test_forward_images_is_side_of_fusion_of_encoder(config_class):
    model = make_model(config_class).eval()
    lpm_images, side_images = views()
    logits = model.forward_images(lpm_images, side_images)
    assert logits.shape == (2, 3)

    features = model.encoder(lpm_images)
    num_tokens = 1 + (32 // PATCH) ** 2
    assert features.keys.shape == (2, len(TAPPED), NUM_HEADS, int(num_tokens * 0.3), EMBED_DIM // NUM_HEADS)
    fused = model.fusion(features.keys, features.values)
    expected = model.side(side_images, fused)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    torch.testing.assert_close(model(side_images, features.keys, features.values), expected, atol=0, rtol=0)
    # The prompts matter: the side network alone gives something else.
    assert not torch.allclose(logits, model.side(side_images), atol=1e-4)


@pytest.mark.parametrize("config_class", [FPTConfig, FPTPlusConfig])
def test_backward_reaches_only_fusion_and_side_parameters(config_class):
    model = make_model(config_class).train()
    assert not model.encoder.training
    assert model.fusion.training and model.side.training
    lpm_images, side_images = views()
    logits = model.forward_images(lpm_images, side_images)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()

    for name, param in model.encoder.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
    for module in (model.fusion, model.side):
        for name, param in module.named_parameters():
            assert param.requires_grad, name
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("config_class", [FPTConfig, FPTPlusConfig])
def test_learnable_parameters_are_exactly_fusion_and_side(config_class):
    model = make_model(config_class)
    fusion_and_side = sum(p.numel() for m in (model.fusion, model.side) for p in m.parameters())
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert encoder_params > 0
    assert model.num_learnable_params() == fusion_and_side
    assert sum(p.numel() for p in model.parameters()) == fusion_and_side + encoder_params
    trainable_keys = set(model.trainable_state_dict())
    assert trainable_keys
    assert not any(key.startswith("encoder.") for key in trainable_keys)
    assert {f"fusion.{k}" for k in model.fusion.state_dict()} <= trainable_keys
    assert {f"side.{k}" for k in model.side.state_dict()} <= trainable_keys


def test_side_width_not_divisible_by_the_heads_is_rejected():
    lpm = VisionTransformer(img_size=32, patch_size=PATCH, embed_dim=48, depth=2, num_heads=4, dynamic_img_size=True)
    config = FPTPlusConfig(backbone="unused", num_classes=3, lpm_input_size=32, side_input_size=16)
    with pytest.raises(FPTError):  # 48 / 8 = 6 side channels cannot be split over 4 heads
        FPTModel(config, LPMGeometry.from_model(lpm))


def test_encoding_without_an_encoder_is_an_fpt_error():
    geometry = LPMGeometry(embed_dim=EMBED_DIM, num_heads=NUM_HEADS, depth=DEPTH, patch_size=PATCH, num_prefix_tokens=1)
    config = FPTPlusConfig(backbone="unused", num_classes=3, lpm_input_size=32, side_input_size=16)
    model = FPTModel(config, geometry)
    assert model.config.tapped_layers == [2, 3]  # FPT+ preset: the last half of the blocks
    with pytest.raises(FPTError):
        model.encode(torch.zeros(1, 3, 32, 32))
