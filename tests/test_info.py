"""Parameter counts and `fpt info`: the published numbers for ViT-B/16 at 384 px with 5 classes."""

from __future__ import annotations

import gc
import json

import pytest

from fpt.cli import main
from fpt.config import FPTConfig, FPTPlusConfig, SideOnlyConfig
from fpt.info import format_model_info, model_info
from fpt.models.build import build_model
from fpt.models.fpt import FPTModel

VIT_B_PARAMS = 86_859_496  # vit_base_patch16_384 with its 1000-class head


@pytest.mark.parametrize(
    ("config_class", "learnable", "percent", "layers"),
    [(FPTConfig, 1_602_341, "1.81", list(range(12))), (FPTPlusConfig, 900_965, "1.03", list(range(6, 12)))],
)
def test_vit_b_counts_match_the_papers(config_class: type[FPTConfig], learnable: int, percent: str, layers) -> None:
    model = FPTModel.from_config(config_class(backbone="vit_base_patch16_384", num_classes=5), pretrained_lpm=False)
    info = model_info(model)
    assert info.learnable_params == learnable
    assert info.frozen_params == VIT_B_PARAMS
    assert info.frozen_params_without_head == VIT_B_PARAMS - (768 * 1000 + 1000)
    assert f"{100 * info.learnable_ratio:.2f}" == percent
    assert info.tapped_layers == layers
    # 512 px: 1 + 32 * 32 tokens, 20 % kept per head; K and V of 12 heads x 64 dims per tapped layer
    assert (info.lpm_tokens, info.tokens_kept_per_layer) == (1025, 205)
    assert info.cached_bytes_per_image["float16"] == 2 * len(layers) * 12 * 205 * 64 * 2
    assert f"{learnable:,}" in format_model_info(info)


def test_cli_info_json(capsys: pytest.CaptureFixture[str], tiny_spec) -> None:
    args = ["info", "--backbone", tiny_spec.name, "--backbone-weights", tiny_spec.weights, "--method", "fpt"]
    args += ["--num-classes", "3", "--input-size", "64", "--side-input-size", "16", "--tapped-layers", "1,3", "--json"]
    # the tiny architecture's overrides are not CLI options, so count ViT-Tiny (192 wide, 3 heads) itself
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"learnable_params", "frozen_params", "learnable_ratio"} <= info.keys()
    assert info["tapped_layers"] == [1, 3]
    assert info["lpm_tokens"] == 1 + (64 // 16) ** 2
    assert info["side_width"] == 192 // 8
    assert info["learnable_ratio"] == pytest.approx(
        info["learnable_params"] / (info["learnable_params"] + info["frozen_params"])
    )


def test_side_only_info_counts_its_side_network_and_no_frozen_lpm(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["info", "--backbone", "vit_base_patch16_384", "--method", "side-only", "--num-classes", "5"]
    assert main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    fpt_plus = model_info(
        build_model(FPTPlusConfig(backbone="vit_base_patch16_384", num_classes=5), pretrained_lpm=False)
    )
    side_params = sum(p.numel() for p in build_model(SideOnlyConfig("vit_base_patch16_384", 5)).parameters())
    assert info["learnable_params"] == side_params < fpt_plus.learnable_params
    assert (info["frozen_params"], info["learnable_ratio"]) == (0, 1.0)
    assert (info["side_input_size"], info["side_width"], info["tapped_layers"]) == (128, 96, list(range(6, 12)))
    assert "cached_bytes_per_image" not in info and "num_prompts" not in info
    assert main(args) == 0
    assert "128 px, width 96, no prompts" in capsys.readouterr().out


def test_cli_user_errors_are_one_line_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backbone", "vit_base_patch16_348", "--num-classes", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fpt: error: unknown timm model 'vit_base_patch16_348'")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_keeps_the_garbage_collector_on_while_it_works_and_after_it_returns(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fpt.info

    collecting_while_counting = []
    counted = fpt.info.model_info
    monkeypatch.setattr(
        fpt.info, "model_info", lambda model: collecting_while_counting.append(gc.isenabled()) or counted(model)
    )

    assert main(["info", "--backbone", "vit_base_patch16_384", "--num-classes", "2", "--json"]) == 0
    assert main(["info", "--backbone", "vit_base_patch16_348", "--num-classes", "2"]) == 1  # an error after importing
    assert collecting_while_counting == [True] and gc.isenabled()
    capsys.readouterr()


def test_cli_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backbone", "--backbone-weights", "--method", "--num-classes", "--input-size", "--json"):
        assert option in out


def test_input_sizes_must_be_multiples_of_the_patch_size(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["info", "--backbone", "vit_small_patch14_reg4_dinov2", "--num-classes", "2"]
    assert main(args) == 1
    assert "lpm_input_size (--input-size) 512 is not a multiple of the LPM's patch size 14; use 504 or 518" in (
        capsys.readouterr().err
    )
    assert main([*args, "--input-size", "518", "--side-input-size", "126", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lpm"]["prefix_tokens"] == 5  # CLS + 4 registers
    assert info["lpm_tokens"] == 5 + 37 * 37
