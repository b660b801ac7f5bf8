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
