"""save_pretrained / from_pretrained: config.json + trainable-only safetensors, restored exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpt.config import FPTConfig, FPTPlusConfig
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from fpt.models.build import load_model
from fpt.models.fpt import FPTModel
from tests.conftest import randomize_


@pytest.mark.parametrize("config_class", [FPTConfig, FPTPlusConfig])
def test_round_trip_restores_the_same_predictions(
    tmp_path: Path, tiny_spec: BackboneSpec, config_class: type[FPTConfig]
) -> None:
    config = config_class(backbone=tiny_spec, num_classes=3, lpm_input_size=48, side_input_size=16, token_ratio=0.3)
    model = FPTModel.from_config(config)
    randomize_(model.fusion, seed=1)
    randomize_(model.side, seed=2)
    model.eval()
    model.save_pretrained(tmp_path)

    restored = load_model(tmp_path).eval()

    lpm_images, side_images = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(
        restored.forward_images(lpm_images, side_images), model.forward_images(lpm_images, side_images)
    )
    assert type(restored.config) is config_class
    assert restored.config == model.config


def test_saved_files_hold_only_trainable_weights_and_the_backbone_spec(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    model = FPTModel.from_config(FPTPlusConfig(backbone=tiny_spec, num_classes=3, side_input_size=16))
    model.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    weights = load_file(tmp_path / "model.safetensors")
    assert all(key.startswith(("fusion.", "side.")) for key in weights)
    assert sum(t.numel() for t in weights.values()) == model.num_learnable_params()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backbone"] == tiny_spec.to_dict()
    assert config["tapped_layers"] == [2, 3]
    assert config["method"] == "fpt+"


def test_loading_without_the_lpm_keeps_only_trainable_modules(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    model = FPTModel.from_config(FPTPlusConfig(backbone=tiny_spec, num_classes=3, side_input_size=16))
    model.save_pretrained(tmp_path)

    light = load_model(tmp_path, load_lpm=False)

    assert light.encoder is None
    assert light.num_learnable_params() == model.num_learnable_params()
    with pytest.raises(FPTError, match="without its LPM"):
        light.encode(torch.randn(1, 3, 32, 32))


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    FPTModel.from_config(FPTPlusConfig(backbone=tiny_spec, num_classes=3, side_input_size=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_prompts"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FPTError, match=r"does not match its config\.json"):
        load_model(tmp_path)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path, tiny_spec: BackboneSpec) -> None:
    FPTPlusConfig(backbone=tiny_spec, num_classes=3, side_input_size=16).save(tmp_path)
    with pytest.raises(FPTError, match="cannot read trained weights"):
        load_model(tmp_path)
