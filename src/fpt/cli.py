"""The ``fpt`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fpt import __version__
from fpt.config import METHOD_CONFIGS, FPTConfig
from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from fpt.models.frozen_encoder import IMPORTANCE_RULES

DEFAULT_BACKBONE = "vit_base_patch16_384"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FPTError as error:
        print(f"fpt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpt: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpt",
        description="Fine-grained Prompt Tuning (FPT, FPT+): transfer a frozen large pre-trained ViT to "
        "high-resolution medical image classification at a few percent of full fine-tuning's memory.",
    )
    parser.add_argument("--version", action="version", version=f"fpt {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="count learnable/frozen parameters, kept tokens and cache size of a configuration",
        description="Build the model (random weights, nothing downloaded) and print its learnable and frozen "
        "parameters, tapped layers, tokens kept per layer and the feature-cache bytes per image.",
    )
    add_model_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.set_defaults(run=_run_info)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that define an FPT/FPT+ configuration; unset ones keep the method's preset."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        metavar="NAME",
        help="the frozen LPM: a timm name (vit_base_patch16_384.orig_in21k_ft_in1k), hf-hub:ORG/REPO, a Hugging "
        f"Face ViT repo id or a local checkpoint directory (default: {DEFAULT_BACKBONE})",
    )
    group.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="local .safetensors/.pth/.bin weights for the --backbone architecture (nothing is downloaded)",
    )
    group.add_argument("--method", choices=sorted(METHOD_CONFIGS), default="fpt+", help="method preset (default: fpt+)")
    group.add_argument("--num-classes", type=int, required=True, metavar="K", help="number of classes")
    group.add_argument("--input-size", type=int, metavar="S", help="LPM input size in pixels (preset: 512)")
    group.add_argument(
        "--side-input-size", type=int, metavar="S", help="side network input size (preset: 224 fpt, 128 fpt+)"
    )
    group.add_argument(
        "--tapped-layers",
        type=_int_list,
        metavar="I,J,...",
        help="LPM layers to tap, 0-based (preset: all for fpt, the last half for fpt+)",
    )
    group.add_argument("--num-prompts", type=int, metavar="M", help="prompts per tapped layer (preset: 16)")
    group.add_argument("--token-ratio", type=float, metavar="R", help="fraction of tokens kept per head (preset: 0.2)")
    group.add_argument("--importance", choices=IMPORTANCE_RULES, help="token importance rule (preset: global)")


def config_from_args(args: argparse.Namespace) -> FPTConfig:
    overrides = {
        "lpm_input_size": args.input_size,
        "side_input_size": args.side_input_size,
        "tapped_layers": args.tapped_layers,
        "num_prompts": args.num_prompts,
        "token_ratio": args.token_ratio,
        "importance": args.importance,
    }
    return METHOD_CONFIGS[args.method](
        backbone=BackboneSpec(args.backbone, weights=args.backbone_weights),
        num_classes=args.num_classes,
        **{name: value for name, value in overrides.items() if value is not None},
    )


def _run_info(args: argparse.Namespace) -> int:
    from fpt.info import format_model_info, model_info
    from fpt.models.fpt import FPTModel

    model = FPTModel.from_config(config_from_args(args), pretrained_lpm=False)
    info = model_info(model)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
