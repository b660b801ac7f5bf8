"""Command-line options against the configs: an option the method has no field for is an error, help texts show
the dataclasses' defaults, the cache default belongs to the command line, and the debug escape hatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpt.cli import DEFAULT_CACHE, build_parser, config_from_args, main, training_config_from_args
from fpt.config import (
    PAPER_TRAINING,
    SideOnlyConfig,
    TrainingConfig,
    config_from_dict,
    recipe_training,
)
from fpt.errors import FPTError
from tests.pipeline_fixtures import one_line_error

pytest_plugins = ("tests.pipeline_fixtures",)


@pytest.mark.parametrize("option", [["--num-prompts", "99"], ["--token-ratio", "0.5"], ["--importance", "cls"]])
def test_side_only_refuses_the_fusion_options_it_has_no_field_for(capsys: pytest.CaptureFixture, option) -> None:
    args = build_parser().parse_args(["train", "data", "--run", "r", "--method", "side-only", *option])
    with pytest.raises(FPTError, match=f"--method side-only has no {option[0]}; drop the option"):
        config_from_args(args)
    assert main(["info", "--method", "side-only", "--num-classes", "2", *option]) == 1
    assert f"--method side-only has no {option[0]}" in one_line_error(capsys)


def test_side_only_takes_its_side_network_options() -> None:
    args = build_parser().parse_args(["train", "d", "--run", "r", "--method", "side-only", "--side-input-size", "64"])
    config = config_from_args(args)
    assert isinstance(config, SideOnlyConfig) and config.side_input_size == 64
    assert not hasattr(config, "num_prompts") and not hasattr(config, "token_ratio")


def test_a_side_only_config_written_with_fusion_fields_still_loads() -> None:
    saved = {"method": "side-only", "backbone": {"name": "x"}, "num_classes": 2, "num_prompts": 16}
    saved |= {"token_ratio": 0.2, "importance": "global", "prompt_dropout": 0.5, "side_input_size": 128}
    assert config_from_dict(saved) == SideOnlyConfig(backbone="x", num_classes=2, side_attention_init="trunc_normal")
    with pytest.raises(FPTError, match="unknown side-only config fields: rank"):
        config_from_dict({**saved, "rank": 4})


def test_help_texts_show_the_defaults_of_the_configs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training epochs, exactly (default: 20, raised on small data to the method's --min-steps)" in text
    assert "(default without --epochs: the method's: 0 full, vpt-deep, lora, adapter; 500 linear, " in text
    assert "peak learning rate (default: the method's: 1e-4 full, vpt-deep, lora, adapter; 1e-2 linear; 1e-3 " in text
    assert "prompts per tapped layer (preset: 16) or per block (vpt-deep: 10)" in text
    assert f"feature cache directory (default: {DEFAULT_CACHE})" in text


def test_the_api_caches_only_when_asked_while_the_command_line_caches_by_default() -> None:
    assert TrainingConfig().cache_dir is None
    parse = build_parser().parse_args
    assert training_config_from_args(parse(["train", "d", "--run", "r"])).cache_dir == DEFAULT_CACHE
    assert training_config_from_args(parse(["train", "d", "--run", "r", "--cache", "c"])).cache_dir == "c"
    assert training_config_from_args(parse(["train", "d", "--run", "r", "--no-cache"])).cache_dir is None


def test_a_training_config_with_unknown_fields_is_refused() -> None:
    recorded = TrainingConfig(epochs=3).to_dict()
    assert TrainingConfig.from_dict(recorded) == TrainingConfig(epochs=3)
    with pytest.raises(FPTError, match="unknown training config fields: warmup_steps"):
        TrainingConfig.from_dict({**recorded, "warmup_steps": 5})


def test_debug_escape_hatch_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    command = ["evaluate", str(tmp_path)]
    assert main(command) == 1
    assert "is not a training run" in one_line_error(capsys)
    with pytest.raises(FPTError, match="is not a training run"):
        main(["--traceback", *command])
    monkeypatch.setenv("FPT_DEBUG", "1")
    with pytest.raises(FPTError, match="is not a training run"):
        main(command)
    monkeypatch.setenv("FPT_DEBUG", "0")
    assert main(command) == 1


def test_info_json_of_every_method_is_valid(capsys: pytest.CaptureFixture[str], tiny_lpm_dir: Path) -> None:
    for method in ("fpt+", "fpt", "side-only", "linear", "lora"):
        args = ["info", "--backbone", str(tiny_lpm_dir), "--method", method, "--num-classes", "3"]
        assert main([*args, "--input-size", "64", "--json"]) == 0, method
        info = json.loads(capsys.readouterr().out)
        assert info["method"] == method and info["learnable_params"] > 0


def test_recipe_paper_sets_the_official_settings_and_explicit_options_override_it() -> None:
    parse = build_parser().parse_args
    paper = parse(["train", "d", "--run", "r", "--recipe", "paper"])
    training, config = training_config_from_args(paper), config_from_args(paper)
    assert (training.lr, training.weight_decay, training.weight_decay_scope, training.epochs) == (1e-4, 0.1, "all", 20)
    assert (training.warmup_epochs, training.min_steps, training.fusion_lr_scale) == (0.0, 0, 1.0)
    assert (config.prompt_dropout, config.side_attention_init) == (0.5, "trunc_normal")
    assert {name: getattr(training, name) for name in PAPER_TRAINING} == PAPER_TRAINING

    overridden = parse(["train", "d", "--run", "r", "--recipe", "paper", "--lr", "1e-3", "--prompt-dropout", "0.1"])
    assert training_config_from_args(overridden).lr == 1e-3 and training_config_from_args(overridden).epochs == 20
    assert config_from_args(overridden).prompt_dropout == 0.1

    default = parse(["train", "d", "--run", "r"])
    assert training_config_from_args(default) == TrainingConfig(cache_dir=DEFAULT_CACHE)
    linear = parse(["train", "d", "--run", "r", "--recipe", "paper", "--method", "linear"])
    assert not hasattr(config_from_args(linear), "prompt_dropout")  # the recipe sets only fields a method has
    side_only = config_from_args(parse(["train", "d", "--run", "r", "--recipe", "paper", "--method", "side-only"]))
    assert side_only.side_attention_init == "trunc_normal"
    vpt = config_from_args(parse(["train", "d", "--run", "r", "--recipe", "paper", "--method", "vpt-deep"]))
    assert vpt.prompt_dropout == 0.0  # the fusion's official dropout is not VPT-deep's
    with pytest.raises(FPTError, match="unknown recipe 'nope'; choose from default, paper"):
        recipe_training("nope")


def test_min_steps_prompt_dropout_and_side_attention_init_reach_the_configs() -> None:
    options = ["--min-steps", "500", "--prompt-dropout", "0.2", "--side-attention-init", "trunc_normal"]
    args = build_parser().parse_args(["train", "d", "--run", "r", *options])
    assert training_config_from_args(args).min_steps == 500
    parse = build_parser().parse_args
    asked = training_config_from_args(parse(["train", "d", "--run", "r", "--epochs", "3"]))
    assert (asked.epochs, asked.min_steps) == (3, None)  # resolved to 3 epochs and no step minimum when training
    unasked = training_config_from_args(parse(["train", "d", "--run", "r"]))
    assert (unasked.epochs, unasked.min_steps) == (None, None)  # the method's schedule
    config = config_from_args(args)
    assert (config.prompt_dropout, config.side_attention_init) == (0.2, "trunc_normal")
    default = config_from_args(build_parser().parse_args(["train", "d", "--run", "r"]))
    assert (default.prompt_dropout, default.side_attention_init) == (0.0, "xavier")


def test_grad_checkpointing_reaches_the_training_config_and_is_off_by_default() -> None:
    parse = build_parser().parse_args
    assert training_config_from_args(parse(["train", "d", "--run", "r", "--grad-checkpointing"])).grad_checkpointing
    assert not training_config_from_args(parse(["train", "d", "--run", "r"])).grad_checkpointing
    assert parse(["bench", "memory", "--grad-checkpointing"]).grad_checkpointing


def test_images_outside_root_reaches_the_training_config_and_is_off_by_default() -> None:
    parse = build_parser().parse_args
    assert not training_config_from_args(parse(["train", "d", "--run", "r"])).images_outside_root
    assert training_config_from_args(parse(["preload", "d", "--images-outside-root"])).images_outside_root


def test_prior_bias_reaches_the_training_config_both_ways_and_the_paper_recipe_has_it_off() -> None:
    parse = build_parser().parse_args
    assert training_config_from_args(parse(["train", "d", "--run", "r", "--prior-bias"])).prior_bias
    assert not training_config_from_args(parse(["train", "d", "--run", "r", "--no-prior-bias"])).prior_bias
    assert training_config_from_args(parse(["train", "d", "--run", "r"])).prior_bias == TrainingConfig().prior_bias
    assert not training_config_from_args(parse(["train", "d", "--run", "r", "--recipe", "paper"])).prior_bias


def test_decay_fraction_reaches_the_training_config_and_is_checked() -> None:
    parse = build_parser().parse_args
    assert (
        training_config_from_args(parse(["train", "d", "--run", "r", "--decay-fraction", "0.3"])).decay_fraction == 0.3
    )
    assert training_config_from_args(parse(["train", "d", "--run", "r", "--recipe", "paper"])).decay_fraction == 1.0
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(FPTError, match="decay fraction must be in"):
            TrainingConfig(decay_fraction=bad)
