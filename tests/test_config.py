"""Method configs: presets, validation, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpt.config import METHOD_CONFIGS, FPTConfig, FPTPlusConfig, config_from_dict, load_config
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec


def test_presets() -> None:
    fpt = FPTConfig(backbone="vit_base_patch16_384", num_classes=5)
    plus = FPTPlusConfig(backbone="vit_base_patch16_384", num_classes=5)
    assert fpt.resolved_tapped_layers(12) == list(range(12))
    assert plus.resolved_tapped_layers(12) == [6, 7, 8, 9, 10, 11]
    assert (fpt.side_input_size, plus.side_input_size) == (224, 128)
    for config in (fpt, plus):
        assert (config.num_prompts, config.token_ratio, config.importance, config.lpm_input_size) == (
            16,
            0.2,
            "global",
            512,
        )
    assert isinstance(fpt.backbone, BackboneSpec)


def test_every_field_is_overridable() -> None:
    config = FPTPlusConfig(
        backbone="vit_small_patch16_224",
        num_classes=3,
        lpm_input_size=1024,
        side_input_size=224,
        tapped_layers=[0, 5],
        num_prompts=8,
        token_ratio=0.1,
        importance="cls",
        prompt_dropout=0.1,
        side_width_divisor=4,
        side_attention_init="trunc_normal",
    )
    assert config.resolved_tapped_layers(12) == [0, 5]


@pytest.mark.parametrize("method", ["fpt", "fpt+", "side-only"])
def test_a_config_written_before_side_attention_init_existed_loads_with_the_init_it_was_trained_with(
    method: str,
) -> None:
    saved = {"method": method, "backbone": {"name": "x"}, "num_classes": 2}
    assert config_from_dict(saved).side_attention_init == "trunc_normal"
    assert config_from_dict({**saved, "side_attention_init": "xavier"}).side_attention_init == "xavier"
    assert METHOD_CONFIGS[method](backbone="x", num_classes=2).side_attention_init == "xavier"


@pytest.mark.parametrize("config_class", [FPTConfig, FPTPlusConfig])
def test_json_round_trip(tmp_path: Path, config_class: type[FPTConfig]) -> None:
    config = config_class(
        backbone=BackboneSpec("vit_tiny_patch16_224", weights="w.safetensors", model_kwargs={"depth": 4}),
        num_classes=4,
        tapped_layers=[1, 3],
    )
    config.save(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["method"] == config_class.method
    restored = load_config(tmp_path)
    assert type(restored) is config_class
    assert restored == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"token_ratio": 0.0}, "token_ratio"),
        ({"token_ratio": 1.5}, "token_ratio"),
        ({"num_prompts": 0}, "num_prompts"),
        ({"importance": "max"}, "importance"),
        ({"prompt_dropout": 1.0}, "prompt_dropout"),
        ({"side_attention_init": "kaiming"}, "side_attention_init must be one of xavier, trunc_normal"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_invalid_values_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(FPTError, match=message):
        FPTConfig(**{"backbone": "vit_base_patch16_384", "num_classes": 2, **overrides})


def test_unknown_method_and_fields_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FPTError, match="unknown method 'vpt'"):
        config_from_dict({"method": "vpt", "backbone": {"name": "x"}, "num_classes": 2})
    with pytest.raises(FPTError, match="unknown fpt\\+ config fields: prompt_length"):
        config_from_dict({"method": "fpt+", "backbone": {"name": "x"}, "num_classes": 2, "prompt_length": 3})
    with pytest.raises(FPTError, match="not a saved fpt model directory"):
        load_config(tmp_path)
