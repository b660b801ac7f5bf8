"""The backbones users bring, end to end through the CLI: every family × {info, preload + train one epoch, predict
with overlays}, on tiny random checkpoints saved the way each family is distributed (weights cannot be downloaded
here): timm checkpoint directories, a bare weights file with its constructor arguments in a JSON file beside it,
and Hugging Face directories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import transformers
from safetensors.torch import save_file

from fpt.cli import main
from tests.conftest import randomize_
from tests.pipeline_fixtures import CLASSES, one_line_error

pytest_plugins = ("tests.pipeline_fixtures",)

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def _timm_directory(arch: str, **kwargs) -> Callable[[Path], list[str]]:
    def save(directory: Path) -> list[str]:
        model = randomize_(timm.create_model(arch, pretrained=False, **TINY, **kwargs), seed=1)
        timm.models.save_for_hf(model, str(directory), model_args={**TINY, **kwargs}, safe_serialization=True)
        return ["--backbone", str(directory)]

    return save


def _uni2_class_weights_file(directory: Path) -> list[str]:
    """A UNI2-h-like checkpoint: a bare state dict of a ViT with 8 registers, LayerScale and a packed SwiGLU MLP,
    whose timm constructor arguments sit in a JSON file beside it (the class as a name)."""
    kwargs = {"reg_tokens": 8, "no_embed_class": True, "init_values": 1e-5, "mlp_ratio": 5.375, "act_layer": "silu"}
    model = timm.create_model(
        "vit_small_patch16_224", img_size=64, mlp_layer=timm.layers.SwiGLUPacked, num_classes=0, **TINY, **kwargs
    )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(randomize_(model, seed=2).state_dict(), directory / "uni2.safetensors")
    kwargs_file = {**TINY, **kwargs, "img_size": 64, "mlp_layer": "SwiGLUPacked", "num_classes": 0}
    (directory / "uni2.json").write_text(json.dumps(kwargs_file))
    return ["--backbone", "vit_small_patch16_224", "--backbone-weights", str(directory / "uni2.safetensors")]


def _hf_directory(model_class: type, config: transformers.PretrainedConfig) -> Callable[[Path], list[str]]:
    def save(directory: Path) -> list[str]:
        randomize_(model_class(config), seed=3).save_pretrained(directory)
        return ["--backbone", str(directory)]

    return save


_HF_DINOV2_REG = transformers.Dinov2WithRegistersConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14, num_register_tokens=4
)
_HF_SIGLIP = transformers.SiglipVisionConfig(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64, patch_size=16
)

# family: (how its checkpoint is saved -> the --backbone options, LPM input size, side input size)
FAMILIES: dict[str, tuple[Callable[[Path], list[str]], int, int]] = {
    "dinov2-registers": (_timm_directory("vit_small_patch14_reg4_dinov2", img_size=56), 56, 28),
    "uni2-class-weights-file": (_uni2_class_weights_file, 64, 32),
    "dinov3-rope": (_timm_directory("vit_small_patch16_dinov3", img_size=64), 64, 32),
    "siglip-no-cls": (_timm_directory("vit_base_patch16_siglip_224", img_size=64), 64, 32),
    "hf-dinov2-registers": (_hf_directory(transformers.Dinov2WithRegistersModel, _HF_DINOV2_REG), 56, 28),
    "hf-siglip": (_hf_directory(transformers.SiglipVisionModel, _HF_SIGLIP), 64, 32),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_info_train_and_predict_with_overlays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], image_data: Path, family: str
) -> None:
    save, size, side_size = FAMILIES[family]
    backbone = save(tmp_path / "lpm")
    model = [*backbone, "--method", "fpt+", "--input-size", str(size), "--side-input-size", str(side_size)]

    assert main(["info", *model, "--num-classes", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lpm"]["embed_dim"] == 64 and info["tapped_layers"] == [1]
    assert info["cached_bytes_per_image"]["float16"] > 0

    run = tmp_path / "run"
    options = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    options += ["--cache", str(tmp_path / "c")]
    assert main(["train", str(image_data), "--run", str(run), *model, *options]) == 0
    assert json.loads((run / "results.json").read_text())
    capsys.readouterr()

    images = [str(image_data / "val" / name / "img000.png") for name in CLASSES[:2]]
    assert main(["predict", str(run), *images, "--explain", str(tmp_path / "maps"), "--device", "cpu"]) == 0
    assert "overlays written" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "maps").iterdir()) == [
        "img000_2_attention.png",
        "img000_attention.png",
    ]


def test_backbone_kwargs_inline_json_builds_the_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = '{"depth": 3, "embed_dim": 64, "num_heads": 4, "reg_tokens": 4}'
    arguments = ["info", "--backbone", "vit_small_patch16_224", "--backbone-kwargs", kwargs, "--num-classes", "2"]
    assert main([*arguments, "--input-size", "64", "--side-input-size", "32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lpm"]["depth"] == 3 and info["lpm"]["prefix_tokens"] == 5


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ("{depth: 3}", "--backbone-kwargs is not valid JSON"),
        ("[3]", "--backbone-kwargs must hold a JSON object of timm constructor arguments, not list"),
        ('{"mlp_layer": "Nope"}', "unknown mlp_layer 'Nope'"),
    ],
)
def test_bad_backbone_kwargs_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], kwargs: str, expected: str
) -> None:
    arguments = ["info", "--backbone", "vit_small_patch16_224", "--backbone-kwargs", kwargs, "--num-classes", "2"]
    assert main(arguments) == 1
    assert expected in one_line_error(capsys)
