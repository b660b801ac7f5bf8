"""Backbone specs: timm names, local weight files, timm and Hugging Face checkpoint directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

from fpt.errors import BackboneError
from fpt.models.backbone import BackboneSpec, hf_state_dict_to_timm, load_backbone
from tests.conftest import TINY_ARCH, TINY_KWARGS, randomize_

transformers = pytest.importorskip("transformers")


def _hf_config(**overrides):
    values = dict(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-12,
    )
    values.update(overrides)
    return transformers.ViTConfig(**values)


def test_local_safetensors_weights_are_loaded_exactly(tiny_spec: BackboneSpec, tiny_vit_file: Path) -> None:
    model = load_backbone(tiny_spec)
    expected = load_file(tiny_vit_file)
    assert model.state_dict().keys() == expected.keys()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_local_pth_weights_with_training_wrapper_and_new_head(tmp_path: Path) -> None:
    source = randomize_(timm.create_model(TINY_ARCH, num_classes=7, **TINY_KWARGS), seed=3)
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)

    model = load_backbone(BackboneSpec(TINY_ARCH, weights=str(path), model_kwargs=TINY_KWARGS))

    assert model.num_classes == 7
    torch.testing.assert_close(model.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    torch.testing.assert_close(model.head.bias, source.head.bias)


def test_checkpoint_without_head_gives_a_headless_model(tmp_path: Path) -> None:
    source = timm.create_model(TINY_ARCH, num_classes=0, **TINY_KWARGS)
    path = tmp_path / "headless.safetensors"
    save_file(source.state_dict(), path)
    model = load_backbone(BackboneSpec(TINY_ARCH, weights=str(path), model_kwargs=TINY_KWARGS))
    assert model.num_classes == 0


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": Path("x")}, path)
    with pytest.raises(BackboneError, match="holds pickled Python objects besides tensors, which fpt never unpickles"):
        load_backbone(BackboneSpec(TINY_ARCH, weights=str(path), model_kwargs=TINY_KWARGS))


@pytest.mark.parametrize(
    ("weights", "message"),
    [("missing.safetensors", "weights file not found"), ("weights.npz", "expected one of")],
)
def test_bad_weight_paths_name_the_file(tmp_path: Path, weights: str, message: str) -> None:
    if weights.endswith(".npz"):
        (tmp_path / weights).write_bytes(b"")
    with pytest.raises(BackboneError, match=message):
        load_backbone(BackboneSpec(TINY_ARCH, weights=str(tmp_path / weights), model_kwargs=TINY_KWARGS))


def test_weights_of_another_architecture_are_refused(tiny_vit_file: Path) -> None:
    spec = BackboneSpec(TINY_ARCH, weights=str(tiny_vit_file), model_kwargs={**TINY_KWARGS, "depth": 5})
    with pytest.raises(BackboneError, match=r"do not match the architecture: missing blocks\.4"):
        load_backbone(spec)


def test_unknown_timm_name_suggests_close_names() -> None:
    with pytest.raises(BackboneError, match=r"Did you mean: .*vit_base_patch16_384"):
        load_backbone(BackboneSpec("vit_base_patch16_348"), pretrained=False)


def test_non_vit_models_are_refused() -> None:
    with pytest.raises(BackboneError, match="resnet18"):
        load_backbone(BackboneSpec("resnet18"), pretrained=False)


def test_models_without_fused_qkv_are_refused() -> None:
    spec = BackboneSpec(
        TINY_ARCH, model_kwargs={**TINY_KWARGS, "block_fn": timm.models.vision_transformer.ParallelScalingBlock}
    )
    with pytest.raises(BackboneError, match="cannot read the keys and values"):
        load_backbone(spec, pretrained=False)


def test_failed_download_says_how_to_pass_a_local_file() -> None:
    code = (
        "from fpt.models.backbone import BackboneSpec, load_backbone\n"
        "load_backbone(BackboneSpec('vit_tiny_patch16_224.augreg_in21k_ft_in1k'))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-fpt-test-cache"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "could not download the pre-trained weights of 'vit_tiny_patch16_224" in result.stderr
    assert "--backbone-weights" in result.stderr


def test_timm_checkpoint_directory(tmp_path: Path) -> None:
    source = randomize_(timm.create_model(TINY_ARCH, num_classes=4, **TINY_KWARGS), seed=5)
    save_for_hf(source, tmp_path, model_args=TINY_KWARGS, safe_serialization=True)

    model = load_backbone(BackboneSpec(str(tmp_path)))

    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), source.eval()(images))


@pytest.mark.parametrize("classifier", [False, True])
def test_hugging_face_vit_directory_matches_transformers(tmp_path: Path, classifier: bool) -> None:
    config = _hf_config(num_labels=3) if classifier else _hf_config()
    hf_class = transformers.ViTForImageClassification if classifier else transformers.ViTModel
    hf_model = randomize_(hf_class(config), seed=7).eval()
    hf_model.save_pretrained(tmp_path)

    model = load_backbone(BackboneSpec(str(tmp_path)))

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if classifier:
            torch.testing.assert_close(model(images), hf_model(pixel_values=images).logits, atol=1e-5, rtol=1e-4)
        else:
            expected = hf_model(pixel_values=images).last_hidden_state
            torch.testing.assert_close(model.forward_features(images), expected, atol=1e-5, rtol=1e-4)
    assert model.num_classes == (3 if classifier else 0)
    assert model.blocks[0].norm1.eps == 1e-12


def test_hugging_face_module_names_of_transformers_5_are_mapped_too() -> None:
    hf_model = randomize_(transformers.ViTModel(_hf_config()), seed=9)
    state_dict = hf_model.state_dict()  # in-memory names may differ from the Hub's file names
    converted = hf_state_dict_to_timm(state_dict)
    assert converted["blocks.1.attn.qkv.weight"].shape == (3 * 48, 48)
    assert "pooler.dense.weight" not in converted
    query = next(
        v
        for k, v in state_dict.items()
        if k.endswith("1.attention.attention.query.weight") or k.endswith("1.attention.q_proj.weight")
    )
    torch.testing.assert_close(converted["blocks.1.attn.qkv.weight"][:48], query)


def test_hugging_face_directory_without_weights_builds_only_when_not_pretrained(tmp_path: Path) -> None:
    _hf_config().save_pretrained(tmp_path)
    assert load_backbone(BackboneSpec(str(tmp_path)), pretrained=False).embed_dim == 48
    with pytest.raises(BackboneError, match=r"neither model\.safetensors nor pytorch_model\.bin"):
        load_backbone(BackboneSpec(str(tmp_path)))


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match=r"must hold a config\.json"):
        load_backbone(BackboneSpec(str(tmp_path)))


def test_backbone_spec_round_trips_through_a_dict() -> None:
    spec = BackboneSpec("vit_small_patch16_224", weights="w.safetensors", model_kwargs={"depth": 6})
    assert BackboneSpec.from_dict(spec.to_dict()) == spec


def test_hf_resampling_gives_transformers_tokens_at_a_new_resolution(tmp_path: Path) -> None:
    """A 32 px checkpoint read at 64 px: with --pos-embed-resampling hf the tokens are transformers' own
    (``interpolate_pos_encoding=True``); timm's antialiased default gives other ones."""
    hf_model = randomize_(transformers.ViTModel(_hf_config()), seed=11).eval()
    hf_model.save_pretrained(tmp_path)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = hf_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        resampled = load_backbone(BackboneSpec(str(tmp_path), pos_embed_resampling="hf"), input_size=64)
        torch.testing.assert_close(resampled.forward_features(images), expected, atol=1e-5, rtol=1e-4)
        timm_way = load_backbone(BackboneSpec(str(tmp_path)), input_size=64).forward_features(images)
    assert (timm_way - expected).abs().max() > 1e-3


def test_dino_resampling_scales_the_grid_by_its_size_plus_a_tenth(tmp_path: Path) -> None:
    """The official FPT code's (DINO's) formula: bicubic, scale factor (new grid + 0.1) / old grid, no
    antialiasing; the CLS position embedding untouched."""
    hf_model = randomize_(transformers.ViTModel(_hf_config()), seed=13).eval()
    hf_model.save_pretrained(tmp_path)
    original = load_backbone(BackboneSpec(str(tmp_path))).pos_embed.detach()

    model = load_backbone(BackboneSpec(str(tmp_path), pos_embed_resampling="dino"), input_size=56)

    grid = original[:, 1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    scaled = torch.nn.functional.interpolate(grid, scale_factor=(7.1 / 4, 7.1 / 4), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], scaled.permute(0, 2, 3, 1).reshape(1, 49, 48))
    torch.testing.assert_close(model.pos_embed[:, :1], original[:, :1])
    hf_way = load_backbone(BackboneSpec(str(tmp_path), pos_embed_resampling="hf"), input_size=56).pos_embed
    assert 0 < (model.pos_embed - hf_way).abs().max() < 0.5
    images = torch.randn(1, 3, 56, 56)
    assert model.forward_features(images).shape == (1, 50, 48)


def test_resampling_other_than_timm_is_recorded_and_refused_for_rotary_models(tmp_path: Path) -> None:
    assert "pos_embed_resampling" not in BackboneSpec("x").to_dict()  # older fingerprints stay equal
    spec = BackboneSpec("x", pos_embed_resampling="dino")
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(Exception, match="pos_embed_resampling must be one of timm, hf, dino"):
        BackboneSpec("x", pos_embed_resampling="nearest")
    eva = BackboneSpec("vit_small_patch16_dinov3", model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    eva.pos_embed_resampling = "hf"
    with pytest.raises(BackboneError, match="VisionTransformer models; this backbone is a Eva"):
        load_backbone(eva, pretrained=False, input_size=64)


def test_a_masked_autoencoder_checkpoint_loads_without_its_decoder(tmp_path: Path) -> None:
    """RETFound-MAE-class weights: the encoder under "model", with the MAE decoder and mask token beside it."""
    source = randomize_(timm.create_model(TINY_ARCH, num_classes=0, **TINY_KWARGS), seed=21)
    state = {
        **source.state_dict(),
        "mask_token": torch.zeros(1, 1, 64),
        "decoder_embed.weight": torch.zeros(32, 64),
        "decoder_blocks.0.attn.qkv.weight": torch.zeros(96, 32),
        "decoder_pred.weight": torch.zeros(48, 32),
    }
    save_file(state, tmp_path / "mae.safetensors")

    model = load_backbone(BackboneSpec(TINY_ARCH, str(tmp_path / "mae.safetensors"), dict(TINY_KWARGS)))

    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(images), source.eval().forward_features(images))


def test_every_resampling_leaves_the_embeddings_alone_at_the_checkpoint_s_own_size(tmp_path: Path) -> None:
    """DINO's formula returns the pre-trained embeddings unchanged at their own grid, as the official code does."""
    transformers.ViTModel(_hf_config()).save_pretrained(tmp_path)
    original = load_backbone(BackboneSpec(str(tmp_path))).pos_embed
    for method in ("hf", "dino"):
        model = load_backbone(BackboneSpec(str(tmp_path), pos_embed_resampling=method), input_size=32)
        torch.testing.assert_close(model.pos_embed, original, atol=0, rtol=0)


def test_a_sparse_hugging_face_config_takes_the_family_s_defaults(tmp_path: Path) -> None:
    """Older transformers wrote a SigLIP vision_config as its difference from the defaults."""
    from fpt.models.backbone import vit_from_hf_config

    model = vit_from_hf_config({"model_type": "siglip_vision_model", "num_hidden_layers": 2})
    assert model.blocks[0].norm1.eps == 1e-6 and model.embed_dim == 768 and len(model.blocks) == 2
    assert type(model.blocks[0].mlp.act).__name__ == "GELUTanh"


def test_sharded_hugging_face_checkpoints_are_read(tmp_path: Path) -> None:
    hf_model = randomize_(transformers.ViTModel(_hf_config()), seed=31).eval()
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_backbone(BackboneSpec(str(tmp_path)))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = hf_model(pixel_values=images).last_hidden_state
        torch.testing.assert_close(model.forward_features(images), expected, atol=1e-5, rtol=1e-4)


def test_backbone_kwargs_are_refused_for_hugging_face_directories(tmp_path: Path) -> None:
    transformers.ViTModel(_hf_config()).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="--backbone-kwargs applies to timm architectures"):
        load_backbone(BackboneSpec(str(tmp_path), model_kwargs={"depth": 2}))
