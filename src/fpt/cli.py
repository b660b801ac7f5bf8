"""The ``fpt`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from fpt import __version__
from fpt.cache import CACHE_DTYPES
from fpt.config import METHOD_CONFIGS, MethodConfig
from fpt.data.transforms import Augmentation
from fpt.errors import FPTError
from fpt.metrics import METRIC_NAMES
from fpt.models.backbone import BackboneSpec
from fpt.models.frozen_encoder import IMPORTANCE_RULES
from fpt.report import TABLE_METRICS
from fpt.runtime import PRECISIONS
from fpt.train import TrainingConfig

DEFAULT_BACKBONE = "vit_base_patch16_384"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except FPTError as error:
        message = str(error)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the original message
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"fpt: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpt: interrupted; everything finished so far is kept (rerun to continue)", file=sys.stderr)
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
        description="Build the model (random weights, no weights downloaded) and print its learnable and frozen "
        "parameters, tapped layers, tokens kept per layer and the feature-cache bytes per image.",
    )
    add_model_arguments(info, num_classes_required=True)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.set_defaults(handler=_run_info)

    preload = commands.add_parser(
        "preload",
        help="run the frozen LPM once over a dataset and cache the selected keys/values",
        description="Compute the LPM's important-token keys/values for every image of DATA and store them in "
        "--cache. Resumable: rerunning computes only what is missing.",
    )
    preload.add_argument("data", metavar="DATA", help="dataset folder (ROOT/{train,val,test}/<class>/) or CSV")
    add_model_arguments(preload)
    _add_data_arguments(preload)
    preload.add_argument(
        "--overwrite", action="store_true", help="empty the cache first (needed when it was built with other settings)"
    )
    preload.set_defaults(handler=_run_preload)

    train = commands.add_parser(
        "train",
        help="train FPT/FPT+ or a baseline on a dataset (preloading FPT's features first)",
        description="Train --method on DATA into the run directory --run. For fpt and fpt+ the feature cache is "
        "built or completed first unless --no-cache; the baselines (full, linear, vpt-deep, lora, adapter) "
        "train through the LPM on the augmented high-resolution view. `fpt train --resume RUN` continues an "
        "interrupted run.",
    )
    train.add_argument("data", nargs="?", metavar="DATA", help="dataset folder or CSV manifest")
    train.add_argument("--run", metavar="DIR", help="run directory to create")
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run in RUN from its last checkpoint")
    add_model_arguments(train)
    _add_data_arguments(train)
    _add_training_arguments(train)
    train.set_defaults(handler=_run_train)

    evaluate = commands.add_parser(
        "evaluate", help="print a run's metrics on a split", description="Evaluate a trained run on one split."
    )
    evaluate.add_argument("run_dir", metavar="RUN", help="run directory written by `fpt train`")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: test")
    evaluate.add_argument("--checkpoint", default="best", choices=("best", "last"), help="default: best")
    evaluate.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    evaluate.set_defaults(handler=_run_evaluate)

    predict = commands.add_parser(
        "predict",
        help="class probabilities for images, optionally with prompt-attention overlays",
        description="Load the LPM and a run's trained weights and print class probabilities per image.",
    )
    predict.add_argument("run_dir", metavar="RUN", help="run directory written by `fpt train`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    predict.add_argument("--checkpoint", default="best", choices=("best", "last"), help="default: best")
    predict.add_argument("--csv", metavar="FILE", help="also write the probabilities to FILE")
    predict.add_argument("--explain", metavar="DIR", help="write a PNG per image of where the prompts attended")
    predict.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's)")
    predict.set_defaults(handler=_run_predict)

    synth = commands.add_parser(
        "synth",
        help="write the synthetic high-resolution fundus benchmark (4 lesion grades)",
        description="Write seeded synthetic fundus images, graded by lesions too small for a 128 px view, as "
        "OUT/{train,val,test}/<grade>/<seed>.png plus OUT/labels.csv.",
    )
    synth.add_argument("out", metavar="OUT", help="output folder")
    synth.add_argument("--train", type=int, default=240, help="training images (default: 240)")
    synth.add_argument("--val", type=int, default=60, help="validation images (default: 60)")
    synth.add_argument("--test", type=int, default=160, help="test images (default: 160)")
    synth.add_argument("--first-seed", type=int, default=0, help="seed of the first image (default: 0)")
    synth.add_argument("--size", type=int, default=512, help="image size in pixels (default: 512)")
    synth.set_defaults(handler=_run_synth)

    demo = commands.add_parser(
        "demo",
        help="the whole method on synthetic fundus images: FPT+ vs. its side network alone",
        description="Generate the synthetic benchmark (if absent), preload the shipped pre-trained LPM, train "
        "FPT+ and the side-only control, and write a comparison, demo_results.json and an HTML report.",
    )
    demo.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default: demo_output)")
    demo.add_argument("--epochs", type=int, default=40, help="training epochs per method (default: 40)")
    demo.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    demo.set_defaults(handler=_run_demo)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, num_classes_required: bool = False) -> None:
    """Options that define a method's configuration; unset ones keep the method's preset."""
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
    group.add_argument(
        "--method",
        choices=tuple(METHOD_CONFIGS),
        default="fpt+",
        help="fpt+ (default) or fpt; the baselines full, linear, vpt-deep, lora, adapter; or side-only",
    )
    if num_classes_required:
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
    group.add_argument(
        "--num-prompts", type=int, metavar="M", help="prompts per tapped layer (preset: 16) or per block (vpt-deep: 10)"
    )
    group.add_argument("--token-ratio", type=float, metavar="R", help="fraction of tokens kept per head (preset: 0.2)")
    group.add_argument("--importance", choices=IMPORTANCE_RULES, help="token importance rule (preset: global)")
    group.add_argument("--lora-rank", type=int, metavar="R", help="lora: rank of the qkv update (preset: 8)")
    group.add_argument("--lora-alpha", type=float, metavar="A", help="lora: the update is scaled by A / rank (8)")
    group.add_argument("--adapter-dim", type=int, metavar="D", help="adapter: bottleneck width (preset: 64)")


MODEL_OPTIONS = {  # config field: command-line option
    "lpm_input_size": "--input-size",
    "side_input_size": "--side-input-size",
    "tapped_layers": "--tapped-layers",
    "num_prompts": "--num-prompts",
    "token_ratio": "--token-ratio",
    "importance": "--importance",
    "rank": "--lora-rank",
    "alpha": "--lora-alpha",
    "bottleneck_dim": "--adapter-dim",
}


def config_from_args(args: argparse.Namespace) -> MethodConfig:
    """The model config of the parsed options (classes default to 1 until the data says how many)."""
    config_class = METHOD_CONFIGS[args.method]
    given = {
        name: getattr(args, option.removeprefix("--").replace("-", "_"))
        for name, option in MODEL_OPTIONS.items()
        if getattr(args, option.removeprefix("--").replace("-", "_")) is not None
    }
    accepted = {f.name for f in fields(config_class)}
    unused = [MODEL_OPTIONS[name] for name in given if name not in accepted]
    if unused:
        raise FPTError(f"--method {args.method} has no {', '.join(unused)}; drop the option or pick another method")
    return config_class(
        backbone=BackboneSpec(args.backbone, weights=args.backbone_weights).with_absolute_paths(),
        num_classes=getattr(args, "num_classes", None) or 1,
        **given,
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and feature cache")
    group.add_argument("--cache", metavar="DIR", help="feature cache directory (default: fpt-cache)")
    group.add_argument(
        "--cache-dtype", choices=tuple(CACHE_DTYPES), help="dtype of cached keys/values (default: float16)"
    )
    group.add_argument(
        "--norm",
        choices=("backbone", "auto"),
        help="normalisation: the backbone's mean/std (default) or the training set's statistics (auto)",
    )
    group.add_argument("--val-fraction", type=float, metavar="F", help="share of train made into val if absent (0.15)")
    group.add_argument(
        "--test-fraction", type=float, metavar="F", help="share of train made into test if absent (0.15)"
    )
    group.add_argument("--batch-size", type=int, metavar="B", help="batch size (default: 16)")
    group.add_argument("--workers", type=int, metavar="N", help="DataLoader workers (default: spare cores, max 4)")
    group.add_argument("--device", help="auto (cuda > mps > cpu, default), cpu, cuda, cuda:N or mps")
    group.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), or bf16/fp16 autocast on GPUs")
    group.add_argument("--seed", type=int, help="seed for splits, shuffling, augmentation and init (default: 0)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--no-cache", action="store_true", help="run the LPM on the fly instead of caching features")
    group.add_argument("--epochs", type=int, help="default: 20")
    group.add_argument("--lr", type=float, help="peak learning rate (default: 1e-4)")
    group.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.1)")
    group.add_argument("--warmup-epochs", type=float, help="linear warm-up before cosine decay (default: 0)")
    group.add_argument("--clip-grad-norm", type=float, help="gradient clipping norm, 0 disables (default: 1.0)")
    group.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (default: 0)")
    group.add_argument("--balanced", action="store_true", help="weight the loss by inverse class frequency")
    group.add_argument("--metric", choices=METRIC_NAMES, help="validation metric that picks the best checkpoint")
    group.add_argument("--crop-scale", type=_float_pair, metavar="A,B", help="random-resized-crop scale (0.8,1.0)")
    group.add_argument("--crop-ratio", type=_float_pair, metavar="A,B", help="random-resized-crop ratio (0.7,1.3)")
    group.add_argument("--hflip", type=float, metavar="P", help="horizontal flip probability (default: 0.5)")
    group.add_argument("--brightness", type=float, help="brightness jitter (default: 0.2)")
    group.add_argument("--contrast", type=float, help="contrast jitter (default: 0.2)")


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The training config of the parsed options; unset ones keep ``TrainingConfig``'s defaults."""

    def given(**values):
        return {name: value for name, value in values.items() if value is not None}

    augmentation = Augmentation(
        **given(
            crop_scale=getattr(args, "crop_scale", None),
            crop_ratio=getattr(args, "crop_ratio", None),
            hflip=getattr(args, "hflip", None),
            brightness=getattr(args, "brightness", None),
            contrast=getattr(args, "contrast", None),
        )
    )
    clip = getattr(args, "clip_grad_norm", None)
    options = given(
        epochs=getattr(args, "epochs", None),
        batch_size=args.batch_size,
        lr=getattr(args, "lr", None),
        weight_decay=getattr(args, "weight_decay", None),
        warmup_epochs=getattr(args, "warmup_epochs", None),
        label_smoothing=getattr(args, "label_smoothing", None),
        selection_metric=getattr(args, "metric", None),
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        num_workers=args.workers,
        cache_dir=args.cache,
        cache_dtype=args.cache_dtype,
        normalization=args.norm,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    if clip is not None:
        options["clip_grad_norm"] = clip or None
    if getattr(args, "no_cache", False):
        options["cache_dir"] = None
    return TrainingConfig(**options, balanced_class_weights=getattr(args, "balanced", False), augmentation=augmentation)


def _run_info(args: argparse.Namespace) -> int:
    from fpt.info import format_model_info, model_info
    from fpt.models.build import build_model

    model = build_model(config_from_args(args), pretrained_lpm=False)
    info = model_info(model)
    print(json.dumps(info, indent=2) if args.json else format_model_info(info))
    return 0


def _run_preload(args: argparse.Namespace) -> int:
    from fpt.train import cache_features, prepare

    training = training_config_from_args(args)
    dataset, model, normalization = prepare(args.data, config_from_args(args), training)
    summary = cache_features(model, dataset, normalization, training, overwrite=args.overwrite)
    print(
        f"cache {summary.cache_dir}: {summary.computed} images computed, {summary.reused} already cached, "
        f"{summary.bytes_on_disk / 2**20:.1f} MiB on disk, {summary.seconds:.1f} s"
    )
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from fpt.train import resume, train

    if args.resume:
        ignored = _options_given_with_resume(args)
        if ignored:
            raise FPTError(
                f"--resume continues a run with its recorded settings; only --device and --workers may change "
                f"(drop {', '.join(ignored)})"
            )
        results = resume(args.resume, device=args.device, num_workers=args.workers)
        run_dir = Path(args.resume)
    else:
        if not args.data or not args.run:
            raise FPTError("give DATA and --run DIR (or --resume RUN to continue a run)")
        results = train(args.data, args.run, config_from_args(args), training_config_from_args(args))
        run_dir = Path(args.run)
    print(_metrics_table({name: results[name] for name in ("best", "last")}))
    print(f"run written to {run_dir} (report: {run_dir / 'report.html'})")
    return 0


def _options_given_with_resume(args: argparse.Namespace) -> list[str]:
    """Options that ``--resume`` would ignore, as the user typed them."""
    defaults = {"backbone": DEFAULT_BACKBONE, "method": "fpt+", "no_cache": False, "balanced": False}
    allowed = {"resume", "device", "workers", "handler"}
    given = [
        name
        for name, value in vars(args).items()
        if name not in allowed and value != defaults.get(name) and value is not None
    ]
    return ["DATA" if name == "data" else f"--{name.replace('_', '-')}" for name in given]


def _run_evaluate(args: argparse.Namespace) -> int:
    from fpt.train import evaluate_run

    metrics = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, device=args.device)
    print(
        json.dumps(metrics, indent=2) if args.json else _metrics_table({f"{args.checkpoint} ({args.split})": metrics})
    )
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from fpt.predict import predict_images

    predictions = predict_images(
        args.run_dir, args.images, checkpoint=args.checkpoint, device=args.device, explain_dir=args.explain
    )
    classes = _run_classes(args.run_dir)
    rows = [[p.path, p.predicted, *(f"{v:.4f}" for v in p.probabilities)] for p in predictions]
    header = ["image", "predicted", *classes]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            csv.writer(handle).writerows([header, *rows])
    if args.explain:
        print(f"prompt-attention overlays written to {args.explain}")
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    from fpt.data.synthetic import write_dataset

    root = write_dataset(
        args.out, {"train": args.train, "val": args.val, "test": args.test}, args.first_seed, args.size
    )
    print(f"wrote {args.train + args.val + args.test} images to {root} (folders and labels.csv)")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from fpt.demo import DemoSettings, run_demo

    run_demo(args.out, DemoSettings(epochs=args.epochs, lr=args.lr, seed=args.seed))
    return 0


def _run_classes(run_dir: str) -> list[str]:
    from fpt.train import Run

    return Run.load(run_dir).dataset.classes


def _metrics_table(columns: dict[str, dict]) -> str:
    width = max(8, *(len(n) for n in columns))
    lines = [f"{'metric':<18}" + "".join(f"{n:>{width + 2}}" for n in columns)]
    for metric in TABLE_METRICS:
        cells = "".join(
            f"{'n/a' if m.get(metric) is None else format(m[metric], '.4f'):>{width + 2}}" for m in columns.values()
        )
        lines.append(f"{metric:<18}{cells}")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got '{text}'") from None
    return low, high
