"""Every LPM family fpt runs: the q, k, v read at a tapped block are exactly what the block's attention uses, and the
Hugging Face DINOv2/SigLIP directories give the tokens transformers gives.

The attention's own output (the input of its ``norm``, before the gate and output projection) is captured by a hook
and compared with ``softmax(q kᵀ · scale) v`` computed from the tapped q, k, v: a wrong projection, a missing
q/k norm, a missing or misplaced RoPE rotation, or a wrong head layout changes it. Weights are random, with
non-zero biases and non-identity norms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import transformers
from timm.layers import SwiGLUPacked
from timm.models import Eva

from fpt.config import BackboneSpec
from fpt.errors import BackboneError
from fpt.models.backbone import load_backbone, vit_from_hf_config
from fpt.models.frozen_encoder import FrozenEncoder, LPMGeometry, received_attention
from fpt.models.lpm_attention import has_class_token, register_positions, tap_attention
from tests.conftest import randomize_

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}
# family: (timm architecture, constructor arguments, input size)
TIMM_FAMILIES: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit": ("vit_small_patch16_224", {**TINY, "img_size": 64, "qkv_bias": True}, 64),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", {**TINY, "img_size": 56}, 56),
    "uni2-class": (  # registers, LayerScale, packed SwiGLU, no_embed_class
        "vit_small_patch16_224",
        {
            **TINY,
            "img_size": 64,
            "reg_tokens": 8,
            "no_embed_class": True,
            "init_values": 1e-5,
            "mlp_layer": SwiGLUPacked,
            "act_layer": "silu",
            "mlp_ratio": 5.375,
        },
        64,
    ),
    "qk-norm": ("vit_small_patch16_224", {**TINY, "img_size": 64, "qk_norm": True}, 64),
    "siglip-no-cls": ("vit_base_patch16_siglip_224", {**TINY, "img_size": 64}, 64),
    "dinov3-rope": ("vit_small_patch16_dinov3", {**TINY, "img_size": 64}, 64),
    "dinov3-rope-qkv-bias": ("vit_small_patch16_dinov3_qkvb", {**TINY, "img_size": 64}, 64),
    "eva-separate-qkv": ("vit_small_patch16_dinov3_qkvb", {**TINY, "img_size": 64, "qkv_fused": False}, 64),
}


def _timm_lpm(family: str, seed: int = 0) -> tuple[torch.nn.Module, int]:
    arch, kwargs, size = TIMM_FAMILIES[family]
    model = timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kwargs)
    return randomize_(model, seed=seed).eval(), size


def _attention_output_and_tapped(model: torch.nn.Module, layer: int, images: torch.Tensor):
    """(the attention's own output [B, N, d], the q, k, v and scale the tap read) at block ``layer``."""
    attn = model.blocks[layer].attn
    seen: dict[str, Any] = {}
    output_hook = attn.norm.register_forward_pre_hook(lambda module, args: seen.update(output=args[0]))
    tap = tap_attention(attn, lambda q, k, v, scale: seen.update(qkv=(q, k, v, scale)))
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        output_hook.remove()
        tap.remove()
    return seen["output"], seen["qkv"]


@pytest.mark.parametrize("family", list(TIMM_FAMILIES))
def test_tapped_queries_keys_values_reproduce_the_attention_output(family: str) -> None:
    model, size = _timm_lpm(family)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))

    for layer in range(len(model.blocks)):
        output, (q, k, v, scale) = _attention_output_and_tapped(model, layer, images)
        explicit = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
        batch, heads, tokens, head_dim = q.shape
        assert (heads, tokens) == (4, model.num_prefix_tokens + (size // model.patch_embed.patch_size[0]) ** 2)
        torch.testing.assert_close(explicit.transpose(1, 2).reshape(batch, tokens, heads * head_dim), output)


def test_rope_is_applied_to_the_tapped_keys_of_patches_only() -> None:
    """The DINOv3 keys differ from the unrotated projection on the patches, and equal it on the prefix tokens."""
    model, size = _timm_lpm("dinov3-rope")
    images = torch.randn(1, 3, size, size)
    attn = model.blocks[0].attn
    inputs: dict[str, torch.Tensor] = {}
    hook = attn.register_forward_pre_hook(lambda module, args, kwargs: inputs.update(x=args[0]), with_kwargs=True)
    _, (_, k, _, _) = _attention_output_and_tapped(model, 0, images)
    hook.remove()
    unrotated = attn.k_norm(attn.qkv(inputs["x"]).reshape(1, k.shape[2], 3, 4, -1)[:, :, 1].transpose(1, 2))
    prefix = model.num_prefix_tokens
    torch.testing.assert_close(k[:, :, :prefix], unrotated[:, :, :prefix])
    assert (k[:, :, prefix:] - unrotated[:, :, prefix:]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["dinov2-registers", "uni2-class", "dinov3-rope"])
@pytest.mark.parametrize("select_registers", [False, True])
def test_register_tokens_are_candidates_only_when_asked(family: str, select_registers: bool) -> None:
    model, size = _timm_lpm(family)
    registers = register_positions(model)
    assert len(registers) == {"dinov2-registers": 4, "uni2-class": 8, "dinov3-rope": 4}[family]
    encoder = FrozenEncoder(model, [0, 1], token_ratio=0.5, select_registers=select_registers)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))

    features = encoder(images)

    _, (q, k, _, scale) = _attention_output_and_tapped(model, 1, images)
    importance = received_attention(q, k, scale, "global")
    if not select_registers:
        importance[:, :, registers.start : registers.stop] = -torch.inf
    expected = importance.topk(features.token_indices.shape[-1], dim=-1).indices
    torch.testing.assert_close(features.token_indices[:, 1], expected)
    if not select_registers:
        kept = features.token_indices
        assert not ((kept >= registers.start) & (kept < registers.stop)).any()
    assert has_class_token(model) and (features.token_indices == 0).any()  # the CLS token stays a candidate


def test_cls_importance_is_refused_without_a_cls_token() -> None:
    model, _ = _timm_lpm("siglip-no-cls")
    assert not has_class_token(model)
    with pytest.raises(Exception, match="needs a backbone with a CLS token"):
        FrozenEncoder(model, [1], importance="cls")


def test_geometry_counts_registers_apart_from_the_cls_token() -> None:
    assert LPMGeometry.from_model(_timm_lpm("uni2-class")[0]).num_register_tokens == 8
    assert LPMGeometry.from_model(_timm_lpm("uni2-class")[0]).num_prefix_tokens == 9
    assert LPMGeometry.from_model(_timm_lpm("siglip-no-cls")[0]).num_prefix_tokens == 0
    eva = _timm_lpm("dinov3-rope")[0]
    assert isinstance(eva, Eva) and LPMGeometry.from_model(eva).num_register_tokens == 4


def _hf_dinov2_config(registers: int = 0, swiglu: bool = False) -> transformers.PretrainedConfig:
    config_class = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    extra = {"num_register_tokens": registers} if registers else {}
    geometry = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 56, "patch_size": 14}
    return config_class(**geometry, layerscale_value=0.3, use_swiglu_ffn=swiglu, **extra)


def _hf_models() -> dict[str, tuple[Any, int]]:
    siglip = transformers.SiglipVisionConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=64, patch_size=16
    )
    return {
        "dinov2": (transformers.Dinov2Model(_hf_dinov2_config()), 56),
        "dinov2-registers": (transformers.Dinov2WithRegistersModel(_hf_dinov2_config(registers=4)), 56),
        "dinov2-swiglu": (transformers.Dinov2Model(_hf_dinov2_config(swiglu=True)), 56),
        "siglip-vision": (transformers.SiglipVisionModel(siglip), 64),
        "siglip-full": (
            transformers.SiglipModel(
                transformers.SiglipConfig(
                    vision_config=siglip.to_dict(),
                    text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
                )
            ),
            64,
        ),
    }


@pytest.mark.parametrize("name", ["dinov2", "dinov2-registers", "dinov2-swiglu", "siglip-vision", "siglip-full"])
def test_hugging_face_directories_give_the_tokens_transformers_gives(tmp_path: Path, name: str) -> None:
    hf_model, size = _hf_models()[name]
    hf_model = randomize_(hf_model, seed=3).eval()
    hf_model.save_pretrained(tmp_path)

    model = load_backbone(BackboneSpec(str(tmp_path)))

    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        vision = hf_model.vision_model if name == "siglip-full" else hf_model
        expected = vision(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model.forward_features(images), expected, atol=1e-5, rtol=1e-4)
    assert has_class_token(model) == name.startswith("dinov2")
    assert len(register_positions(model)) == (4 if name == "dinov2-registers" else 0)
    mean = model.pretrained_cfg["mean"]
    assert mean == ([0.485, 0.456, 0.406] if name.startswith("dinov2") else [0.5] * 3)


def test_unknown_hugging_face_model_type_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "swin"}')
    with pytest.raises(BackboneError, match=r"model_type vit, dinov2, .*its model_type is 'swin'"):
        load_backbone(BackboneSpec(str(tmp_path)))


def test_a_hugging_face_dinov2_config_builds_timm_s_layout() -> None:
    model = vit_from_hf_config({**_hf_dinov2_config(registers=4).to_dict(), "model_type": "dinov2_with_registers"})
    assert model.num_prefix_tokens == 5 and model.no_embed_class
    assert model.blocks[0].ls1.gamma.shape == (48,)


def test_a_distillation_token_is_not_a_register() -> None:
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    assert model.num_prefix_tokens == 2 and len(register_positions(model)) == 0


def test_the_kept_count_is_a_share_of_the_candidate_tokens() -> None:
    """T = int((N - registers) × ratio) by default, int(N × ratio) with the registers as candidates; never a
    register, even at a ratio of 1."""
    model, size = _timm_lpm("uni2-class")  # 9 prefix tokens (CLS + 8 registers) + 16 patches
    geometry = LPMGeometry.from_model(model)
    images = torch.randn(1, 3, size, size)
    for select, expected in ((False, 17), (True, 25)):
        features = FrozenEncoder(model, [1], token_ratio=1.0, select_registers=select)(images)
        assert features.keys.shape[3] == expected == geometry.feature_shape(1, size, 1.0, select)[2]
    assert not ((features.token_indices >= 1) & (features.token_indices < 9)).all()
    kept = FrozenEncoder(model, [1], token_ratio=1.0)(images).token_indices
    assert not ((kept >= 1) & (kept < 9)).any()


@pytest.mark.parametrize("name", ["dinov2-registers", "siglip-vision"])
def test_hugging_face_models_have_no_state_outside_their_checkpoint(name: str) -> None:
    """They are built without initialisation and filled from the checkpoint, which must then hold every tensor:
    no buffer may live outside the state dict (a missing key is refused at load time)."""
    hf_model, _ = _hf_models()[name]
    model = vit_from_hf_config({**hf_model.config.to_dict(), "model_type": hf_model.config.model_type})
    assert {name for name, _ in model.named_buffers()} <= set(model.state_dict())
