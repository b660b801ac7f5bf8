"""The ``fpt`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import csv
import errno
import gc
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from fpt._version import __version__
from fpt.config import (
    ATTENTION_INITS,
    CACHE_COMPRESSIONS,
    CACHE_DTYPE_NAMES,
    DEFAULT_EPOCHS,
    DEMO_BACKBONE,
    FEATURE_NORMS,
    IMAGE_FORMATS,
    IMPORTANCE_RULES,
    METERS,
    METHOD_CONFIGS,
    METHOD_VARIANTS,
    METRIC_NAMES,
    NORMALIZATIONS,
    POOLINGS,
    POS_EMBED_RESAMPLINGS,
    PRECISIONS,
    RECIPES,
    WEIGHT_DECAY_SCOPES,
    AdapterConfig,
    Augmentation,
    BackboneSpec,
    DemoSettings,
    FPTConfig,
    FPTPlusConfig,
    LinearProbeConfig,
    LoRAConfig,
    MethodConfig,
    SynthTask,
    TrainingConfig,
    VPTDeepConfig,
    cacheable_methods,
    default_value,
    recipe_model,
    recipe_training,
)
from fpt.errors import FPTError

# The parser is built from fpt.config alone (no torch): `fpt --help` starts in well under a second. Each handler
# imports the library modules it needs.

DEFAULT_BACKBONE = "vit_base_patch16_384"
DEFAULT_METHOD = "fpt+"
DEFAULT_CACHE = "fpt-cache"  # the command line caches by default; the API only when TrainingConfig.cache_dir is set


def run() -> None:
    """The ``fpt`` executable and ``python -m fpt``: ``main`` as a process of its own, which it then ends.

    Before the interpreter shuts down, everything still alive is frozen out of the cyclic garbage collector's sight
    (``gc.freeze``): the shutdown's full collections would otherwise walk the library's million or so objects
    (torch, torchvision, timm) only to free them with the process, about half a second on a 2-core CPU.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


@contextmanager
def _importing_library() -> Iterator[None]:
    """Import the library (torch, torchvision, timm and fpt's modules) with the cyclic garbage collector paused.

    Loading them creates about a million long-lived objects; the collector's full passes over them while they load
    find nothing to free and cost about a second on a 2-core CPU. Every handler imports through this.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.traceback or os.environ.get("FPT_DEBUG", "") not in ("", "0")
    try:
        return args.handler(args)
    except FPTError as error:
        if debug:
            raise
        print(f"fpt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpt: interrupted; everything finished so far is kept (rerun to continue)", file=sys.stderr)
        return 130
    except OSError as error:  # the filesystem refused a write or read fpt did not foresee: one line, naming the file
        if debug:
            raise
        advice = {
            errno.ENOSPC: "free space and rerun (finished work is kept)",
            errno.EROFS: "the filesystem is read-only; pass a writable folder",
            errno.EACCES: "fix its permissions or pass another folder",
        }.get(error.errno or 0, "rerun with --traceback for details")
        print(f"fpt: error: {error.filename or 'a file'}: {error.strerror or error}; {advice}", file=sys.stderr)
        return 1


def _training_default(name: str) -> object:
    return default_value(TrainingConfig, name)


def _method_defaults(attribute: str) -> str:
    """Each method's default of a setting, grouped: "1e-4 full, vpt-deep, ...; 1e-3 fpt, ..." (``default_lr``)."""
    groups: dict[float, list[str]] = {}
    for name, config_class in METHOD_CONFIGS.items():
        groups.setdefault(getattr(config_class, attribute), []).append(name)
    shown = {value: f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) else str(value) for value in groups}
    return "; ".join(f"{shown[value]} {', '.join(names)}" for value, names in groups.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpt",
        description="Fine-grained Prompt Tuning (FPT, FPT+): transfer a frozen large pre-trained ViT to "
        "high-resolution medical image classification at a few percent of full fine-tuning's memory.",
    )
    parser.add_argument("--version", action="version", version=f"fpt {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback behind an error (or set FPT_DEBUG=1)"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        help="count learnable/frozen parameters, kept tokens and cache size of a configuration",
        description="Build the model (random weights, no weights downloaded) and print its learnable and frozen "
        "parameters and the learnable ratio; for fpt/fpt+ also the tapped layers, tokens kept per layer and the "
        "feature-cache bytes per image.",
    )
    add_model_arguments(info, num_classes_required=True)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    info.set_defaults(handler=_run_info)

    preload = commands.add_parser(
        "preload",
        help="run the frozen LPM once over a dataset and cache the selected keys/values",
        description="Compute the LPM's features (important-token keys/values, or the probe's pooled embedding) for "
        "every image of DATA and store them in --cache. Resumable: rerunning computes only what is missing. Under "
        "`torchrun --nproc_per_node N -m fpt preload ...` the images are split among the N processes.",
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
        description="Train --method on DATA into the run directory --run. For the methods that train from cached "
        "LPM features (linear, fpt, fpt+) the feature cache is built or completed first; the other baselines "
        "(full, vpt-deep, lora, adapter) train through the LPM on the augmented high-resolution view. `fpt train "
        "--resume RUN` continues an interrupted run. Under `torchrun --nproc_per_node N -m fpt train ...` each "
        "batch of --batch-size images is shared among the N processes, which give the run one process gives "
        "(to float rounding); rank 0 writes the run.",
    )
    train.add_argument("data", nargs="?", metavar="DATA", help="dataset folder or CSV manifest")
    train.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        metavar="DIR",
        help="run directory to create (--run-dir is the same; torchrun takes --run as its own --run-path)",
    )
    train.add_argument("--resume", metavar="RUN", help="continue the interrupted run in RUN from its last checkpoint")
    add_model_arguments(train)
    _add_data_arguments(train)
    _add_training_arguments(train)
    train.set_defaults(handler=_run_train)

    evaluate = commands.add_parser(
        "evaluate", help="print a run's metrics on a split", description="Evaluate a trained run on one split."
    )
    evaluate.add_argument("run_dir", metavar="RUN", help="run directory written by `fpt train`")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"), help="default: %(default)s")
    evaluate.add_argument("--checkpoint", default="best", choices=("best", "last"), help="default: %(default)s")
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
    predict.add_argument("--checkpoint", default="best", choices=("best", "last"), help="default: %(default)s")
    predict.add_argument("--csv", metavar="FILE", help="also write the probabilities to FILE")
    predict.add_argument("--explain", metavar="DIR", help="write a PNG per image of where the prompts attended")
    predict.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: the run's)")
    predict.set_defaults(handler=_run_predict)

    demo_splits = default_value(DemoSettings, "splits")
    synth = commands.add_parser(
        "synth",
        help="write a synthetic high-resolution fundus task (the demo's by default: 4 lesion grades)",
        description="Write seeded synthetic fundus images, graded by lesions too small for a 128 px view, as "
        "OUT/{train,val,test}/<grade>/<seed>.png (or .jpg) plus OUT/labels.csv. The task options make other "
        "tasks: binary (--grades 0,1), imbalanced (--class-ratio 3,1), fewer and smaller lesions.",
    )
    synth.add_argument("out", metavar="OUT", help="output folder")
    for split, noun in (("train", "training"), ("val", "validation"), ("test", "test")):
        synth.add_argument(
            f"--{split}", type=int, default=demo_splits[split], help=f"{noun} images (default: %(default)s)"
        )
    synth.add_argument("--first-seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    synth.add_argument("--size", type=int, default=512, help="image size in pixels (default: %(default)s)")
    task = SynthTask()
    synth.add_argument(
        "--grades",
        type=_int_list,
        metavar="G,G,...",
        help=f"grades that occur, from 0 (none) to 3 (severe) (default: {','.join(map(str, task.grades))})",
    )
    synth.add_argument(
        "--class-ratio", type=_int_list, metavar="N,N,...", help="relative frequency per grade (default: equal)"
    )
    synth.add_argument(
        "--lesion-scale", type=float, metavar="F", help=f"lesion radii relative to the demo's ({task.lesion_scale})"
    )
    synth.add_argument(
        "--lesion-count", type=float, metavar="F", help=f"lesion counts relative to the demo's ({task.lesion_count})"
    )
    synth.add_argument("--format", choices=IMAGE_FORMATS, help=f"image files (default: {task.image_format})")
    synth.set_defaults(handler=_run_synth)

    demo = commands.add_parser(
        "demo",
        help="the whole method on synthetic fundus images: FPT+ vs. a linear probe and its side network alone",
        description="Generate the synthetic benchmark (if absent), preload the shipped pre-trained LPM, train "
        "FPT+, the cached linear probe (its lr chosen on validation) and the side-only control, and write a "
        "comparison, demo_results.json and an HTML report.",
    )
    demo.add_argument("--out", default="demo_output", metavar="DIR", help="output folder (default: %(default)s)")
    demo.add_argument("--epochs", type=int, help="training epochs, exactly (default: fpt train's schedule)")
    demo.add_argument("--lr", type=float, help="peak learning rate of FPT+ and side-only (default: fpt train's)")
    demo.add_argument(
        "--seed", type=int, default=default_value(DemoSettings, "seed"), help="training seed (default: %(default)s)"
    )
    demo.set_defaults(handler=_run_demo)

    cache = commands.add_parser(
        "cache",
        help="inspect a feature cache (info) or check every record against its checksum (verify)",
        description="Feature caches written by `fpt preload` and `fpt train`.",
    )
    cache_commands = cache.add_subparsers(title="cache commands", metavar="ACTION", required=True)
    cache_info = cache_commands.add_parser(
        "info",
        help="entries, record layout, size and fingerprint of a cache",
        description="Print what a cache holds and what its features were computed with.",
    )
    cache_info.add_argument("cache_dir", metavar="DIR", help="cache directory")
    cache_info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cache_info.set_defaults(handler=_run_cache_info)
    cache_verify = cache_commands.add_parser(
        "verify",
        help="read every record against its checksum; drop the corrupt ones, for the next preload to recompute",
        description="Read every record of the cache and compare it with the checksum written with it. Corrupt "
        "records are dropped from the index (atomically, under the cache's lock) and listed; the next `fpt "
        "preload` or `fpt train` recomputes them. Exits with status 1 when any was corrupt.",
    )
    cache_verify.add_argument("cache_dir", metavar="DIR", help="cache directory")
    cache_verify.set_defaults(handler=_run_cache_verify)

    bench = commands.add_parser(
        "bench",
        help="compare methods: training memory and parameters (memory), or accuracy on a dataset (accuracy)",
        description="Benchmarks that put FPT/FPT+ and the baselines side by side, measured alike.",
    )
    benches = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    memory = benches.add_parser(
        "memory",
        help="peak training-step memory, learnable parameters and step time per method",
        description="Meter one training step (forward, backward, AdamW; after a warm-up step) of each method with "
        "random weights. Two meters: measured (CUDA max_memory_allocated, or on CPU the exact peak of live tensor "
        "bytes) and simulated (fake tensors: no memory used, any size predicted). Measuring is skipped, with a "
        "note, where the simulated peak would not fit in free memory.",
    )
    _add_backbone_arguments(memory)
    _add_input_size_argument(memory)
    memory.add_argument(
        "--batch-size",
        type=int,
        default=_training_default("batch_size"),
        metavar="B",
        help="batch size (default: %(default)s)",
    )
    memory.add_argument(
        "--methods",
        type=_METHOD_LIST,
        default=list(METHOD_VARIANTS),
        metavar="LIST",
        help=f"comma-separated, from {', '.join(METHOD_VARIANTS)} (default: all)",
    )
    memory.add_argument(
        "--meters",
        type=_choice_list(METERS, f"meters must be among {', '.join(METERS)}, got '{{text}}'"),
        default=list(METERS),
        metavar="LIST",
        help="measured,simulated (default: both); simulated alone is fast at any size",
    )
    memory.add_argument("--device", default="cpu", help="device of the measured meter (default: %(default)s)")
    memory.add_argument(
        "--num-classes", type=int, default=5, metavar="K", help="classes of the head (default: %(default)s)"
    )
    memory.add_argument(
        "--cache-dtype",
        choices=CACHE_DTYPE_NAMES,
        default=_training_default("cache_dtype"),
        help="dtype of FPT's cached keys/values (default: %(default)s)",
    )
    memory.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute the side networks' blocks in backward (fpt, fpt+, side-only; the others as they are)",
    )
    memory.add_argument(
        "--sweep-input-size",
        type=_int_list,
        metavar="S,S,...",
        help="meter every input size instead of --input-size; writes memory_sweep.csv and memory_sweep.png",
    )
    memory.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    memory.add_argument(
        "--plot",
        nargs="?",
        const="memory.png",
        metavar="PNG",
        help="draw the peaks as a bar chart (default file: memory.png, in --out)",
    )
    memory.add_argument(
        "--out", default=".", metavar="DIR", help="folder for plots and the sweep CSV (default: %(default)s)"
    )
    memory.set_defaults(handler=_run_bench_memory)

    accuracy = benches.add_parser(
        "accuracy",
        help="train methods on one dataset with identical settings and compare AUC, memory, PPE and PME",
        description="Train every --methods on DATA with the same settings into OUT/runs/<method> (finished runs "
        "are reused, interrupted ones resumed), meter their training memory, and write OUT/accuracy.md and "
        "OUT/accuracy.json: AUC, accuracy, kappa, learnable %, peak memory, PPE = AUC*exp(-log10(r+1)) and "
        "PME = AUC*exp(-log10(m+1)), r and m the parameter and memory ratios to full fine-tuning.",
    )
    accuracy.add_argument("data", metavar="DATA", help="dataset folder or CSV manifest")
    accuracy.add_argument("--out", default="fpt-bench-accuracy", metavar="DIR", help="default: %(default)s")
    accuracy.add_argument(
        "--methods",
        type=_METHOD_LIST,
        default=list(METHOD_CONFIGS),
        metavar="LIST",
        help=f"comma-separated (default: {','.join(METHOD_CONFIGS)}; a /no-cache variant runs the LPM every step)",
    )
    _add_backbone_arguments(accuracy)
    _add_input_size_argument(accuracy)
    _add_data_arguments(accuracy)
    _add_training_arguments(accuracy, with_cache_option=False)
    accuracy.add_argument(
        "--lr-grid",
        type=_float_list,
        metavar="LR,LR,...",
        help="train each method at every learning rate and report it at its best on validation (instead of --lr)",
    )
    accuracy.add_argument(
        "--lr-scales",
        type=_float_list,
        metavar="F,F,...",
        help="like --lr-grid, at these multiples of each method's own default learning rate (e.g. 0.1,0.3,1,3)",
    )
    accuracy.set_defaults(handler=_run_bench_accuracy)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser, num_classes_required: bool = False) -> None:
    """Options that define a method's configuration; unset ones keep the method's preset."""

    def preset(config_class: type, name: str) -> object:
        return default_value(config_class, name)

    group = _add_backbone_arguments(parser)
    group.add_argument(
        "--method",
        choices=tuple(METHOD_CONFIGS),
        default=DEFAULT_METHOD,
        help=f"{DEFAULT_METHOD} (default) or fpt; the baselines full, linear, vpt-deep, lora, adapter; or side-only",
    )
    if num_classes_required:
        group.add_argument("--num-classes", type=int, required=True, metavar="K", help="number of classes")
    group.add_argument(
        "--input-size",
        type=int,
        metavar="S",
        help=f"LPM input size in pixels (preset: {preset(MethodConfig, 'lpm_input_size')})",
    )
    group.add_argument(
        "--side-input-size",
        type=int,
        metavar="S",
        help=f"side network input size (preset: {preset(FPTConfig, 'side_input_size')} fpt, "
        f"{preset(FPTPlusConfig, 'side_input_size')} fpt+ and side-only)",
    )
    group.add_argument(
        "--tapped-layers",
        type=_int_list,
        metavar="I,J,...",
        help="LPM layers to tap, 0-based (preset: all for fpt, the last half for fpt+ and side-only)",
    )
    group.add_argument(
        "--side-attention-init",
        choices=ATTENTION_INITS,
        help="how the side network's attention projections start: xavier, or trunc_normal (std 0.02, the "
        f"official code's) (preset: {preset(FPTPlusConfig, 'side_attention_init')})",
    )
    group.add_argument(
        "--num-prompts",
        type=int,
        metavar="M",
        help=f"prompts per tapped layer (preset: {preset(FPTConfig, 'num_prompts')}) or per block "
        f"(vpt-deep: {preset(VPTDeepConfig, 'num_prompts')})",
    )
    group.add_argument(
        "--token-ratio",
        type=float,
        metavar="R",
        help=f"fraction of tokens kept per head (preset: {preset(FPTConfig, 'token_ratio')})",
    )
    group.add_argument(
        "--importance",
        choices=IMPORTANCE_RULES,
        help=f"token importance rule (preset: {preset(FPTConfig, 'importance')})",
    )
    group.add_argument(
        "--select-registers",
        action=argparse.BooleanOptionalAction,
        help="let the LPM's register tokens (DINOv2/DINOv3 reg models) be kept like image tokens; by default they "
        "are not candidates (global sinks, not image regions), while the CLS token always is",
    )
    group.add_argument(
        "--prompt-dropout",
        type=float,
        metavar="P",
        help=f"dropout on the fused prompts (preset: {preset(FPTConfig, 'prompt_dropout')}) or on the prompts "
        f"(vpt-deep: {preset(VPTDeepConfig, 'prompt_dropout')})",
    )
    group.add_argument(
        "--pooling",
        choices=POOLINGS,
        help=f"linear: the embedding the probe reads (preset: {preset(LinearProbeConfig, 'pooling')})",
    )
    group.add_argument(
        "--feature-norm",
        choices=FEATURE_NORMS,
        help="linear: standardize each embedding dimension with the training embeddings' mean and variance, or "
        f"none (preset: {preset(LinearProbeConfig, 'feature_norm')})",
    )
    group.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help=f"lora: rank of the qkv update (preset: {preset(LoRAConfig, 'rank')})",
    )
    group.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help=f"lora: the update is scaled by A / rank (preset: {preset(LoRAConfig, 'alpha'):g})",
    )
    group.add_argument(
        "--adapter-dim",
        type=int,
        metavar="D",
        help=f"adapter: bottleneck width (preset: {preset(AdapterConfig, 'bottleneck_dim')})",
    )


def _add_backbone_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        metavar="NAME",
        help="the pre-trained LPM: a timm name (vit_base_patch16_384.orig_in21k_ft_in1k), hf-hub:ORG/REPO, a "
        "Hugging Face ViT repo id, a local checkpoint directory, or 'demo' (fpt:demo, the shipped demo LPM) "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--backbone-weights",
        metavar="FILE",
        help="local .safetensors/.pth/.bin weights for the --backbone architecture (nothing is downloaded); a "
        "JSON object of timm constructor arguments beside it, FILE with the suffix .json, is read as --backbone-kwargs",
    )
    group.add_argument(
        "--pos-embed-resampling",
        choices=POS_EMBED_RESAMPLINGS,
        help="how a ViT's position embeddings are resampled to --input-size: timm (bicubic, antialiased; default), "
        "hf (bicubic to the grid without antialiasing, as transformers' ViT today) or dino (DINO's scale factor of "
        "the grid + 0.1, as the official FPT code through older transformers: use it to match its features)",
    )
    group.add_argument(
        "--backbone-kwargs",
        metavar="JSON",
        help="timm constructor arguments of the --backbone architecture, a JSON object or a .json file: e.g. "
        '\'{"init_values": 1e-5, "reg_tokens": 8, "mlp_layer": "SwiGLUPacked"}\' for a UNI2-class checkpoint',
    )
    return group


def _add_input_size_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-size",
        type=int,
        default=default_value(MethodConfig, "lpm_input_size"),
        metavar="S",
        help="LPM input size (default: %(default)s)",
    )


def backbone_from_args(args: argparse.Namespace) -> BackboneSpec:
    """The backbone spec of ``--backbone`` / ``--backbone-weights`` ('demo': the shipped demo LPM)."""
    if args.backbone in ("demo", DEMO_BACKBONE):
        from fpt.demo import demo_backbone

        resampling = getattr(args, "pos_embed_resampling", None)
        if args.backbone_weights or getattr(args, "backbone_kwargs", None) or resampling not in (None, "timm"):
            raise FPTError(
                "--backbone demo comes with its own weights and architecture; drop --backbone-weights, "
                "--backbone-kwargs and --pos-embed-resampling"
            )
        return demo_backbone()
    weights = args.backbone_weights
    model_kwargs = _backbone_kwargs(getattr(args, "backbone_kwargs", None), weights)
    resampling = getattr(args, "pos_embed_resampling", None) or "timm"
    spec = BackboneSpec(args.backbone, weights=weights, model_kwargs=model_kwargs, pos_embed_resampling=resampling)
    return spec.with_absolute_paths()


def _backbone_kwargs(given: str | None, weights: str | None) -> dict[str, Any]:
    """--backbone-kwargs (inline JSON or a .json file), else the .json file beside the weights, else none."""
    source, text = "--backbone-kwargs", given
    if given is not None and Path(given).expanduser().is_file():
        source, text = given, Path(given).expanduser().read_text()
    elif given is None and weights is not None and Path(weights).expanduser().with_suffix(".json").is_file():
        source = str(Path(weights).expanduser().with_suffix(".json"))
        text = Path(source).read_text()
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise FPTError(f"{source} is not valid JSON ({error.msg} at line {error.lineno}); give a JSON object") from None
    if not isinstance(kwargs, dict):
        raise FPTError(f"{source} must hold a JSON object of timm constructor arguments, not {type(kwargs).__name__}")
    return kwargs


MODEL_OPTIONS = {  # config field: command-line option
    "lpm_input_size": "--input-size",
    "side_input_size": "--side-input-size",
    "tapped_layers": "--tapped-layers",
    "side_attention_init": "--side-attention-init",
    "num_prompts": "--num-prompts",
    "token_ratio": "--token-ratio",
    "importance": "--importance",
    "select_registers": "--select-registers",
    "prompt_dropout": "--prompt-dropout",
    "pooling": "--pooling",
    "feature_norm": "--feature-norm",
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
        backbone=backbone_from_args(args),
        num_classes=getattr(args, "num_classes", None) or 1,
        **{**recipe_model(getattr(args, "recipe", "default"), config_class), **given},
    )


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    default = _training_default
    group = parser.add_argument_group("data and feature cache")
    group.add_argument("--cache", metavar="DIR", help=f"feature cache directory (default: {DEFAULT_CACHE})")
    group.add_argument(
        "--cache-dtype",
        choices=CACHE_DTYPE_NAMES,
        help=f"dtype of cached features (default: {default('cache_dtype')})",
    )
    group.add_argument(
        "--cache-compression",
        choices=CACHE_COMPRESSIONS,
        help="zstd: compress each cached record losslessly (int8: about 93 %% of its bytes, under a quarter of "
        f"float32's; same results; default: {default('cache_compression')})",
    )
    group.add_argument(
        "--norm",
        choices=NORMALIZATIONS,
        help="normalisation: the backbone's mean/std (default) or the training set's statistics (auto)",
    )
    group.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=f"share of train made into val if absent (default: {default('val_fraction')})",
    )
    group.add_argument(
        "--test-fraction",
        type=float,
        metavar="F",
        help=f"share of train made into test if absent (default: {default('test_fraction')})",
    )
    group.add_argument(
        "--decoded-images-mib",
        type=int,
        metavar="MIB",
        help="decode a split's images once into memory if their pixels fit in MIB (0: decode in every epoch; "
        f"results are the same either way) (default: {default('decoded_images_mib')})",
    )
    group.add_argument(
        "--images-outside-root",
        action="store_true",
        help="let a CSV list images outside its own folder (refused by default)",
    )
    group.add_argument("--batch-size", type=int, metavar="B", help=f"batch size (default: {default('batch_size')})")
    group.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="DataLoader workers (default: spare cores, max 4; never more than a loader has batches, less one)",
    )
    group.add_argument("--device", help="auto (cuda > mps > cpu, default), cpu, cuda, cuda:N or mps")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=f"{default('precision')} (default), or bf16/fp16 autocast on GPUs",
    )
    group.add_argument(
        "--seed", type=int, help=f"seed for splits, shuffling, augmentation and init (default: {default('seed')})"
    )


def _add_training_arguments(parser: argparse.ArgumentParser, with_cache_option: bool = True) -> None:
    default = _training_default
    augmentation = Augmentation()
    group = parser.add_argument_group("training")
    if with_cache_option:
        group.add_argument("--no-cache", action="store_true", help="run the LPM on the fly instead of caching features")
    group.add_argument(
        "--recipe",
        choices=RECIPES,
        default="default",
        help="default: fpt's defaults; paper: the official code's settings (lr 1e-4, weight decay 0.1 on every "
        "parameter, 20 epochs and no step minimum, no warm-up, prompt dropout 0.5, side attention initialised at "
        "std 0.02), for reproducing the papers; options given explicitly override either (default: %(default)s)",
    )
    group.add_argument(
        "--epochs",
        type=int,
        help=f"training epochs, exactly (default: {DEFAULT_EPOCHS}, raised on small data to the method's --min-steps)",
    )
    group.add_argument(
        "--min-steps",
        type=int,
        metavar="N",
        help="run at least N optimizer steps, raising the epochs on small data (default without --epochs: the "
        f"method's: {_method_defaults('default_min_steps')}; with --epochs: 0)",
    )
    group.add_argument(
        "--lr", type=float, help=f"peak learning rate (default: the method's: {_method_defaults('default_lr')})"
    )
    group.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {default('weight_decay')})")
    group.add_argument(
        "--weight-decay-scope",
        choices=WEIGHT_DECAY_SCOPES,
        help="all: every trainable parameter (the official code); weights: only linear/conv weight matrices, "
        f"not prompts, tokens, norms or biases (default: {default('weight_decay_scope')})",
    )
    group.add_argument(
        "--fusion-lr-scale",
        type=float,
        metavar="F",
        help=f"learning rate of the fusion module (prompts) relative to --lr (default: {default('fusion_lr_scale')})",
    )
    group.add_argument(
        "--warmup-epochs", type=float, help=f"linear warm-up before cosine decay (default: {default('warmup_epochs')})"
    )
    group.add_argument(
        "--decay-fraction",
        type=float,
        metavar="F",
        help="the last share of the schedule over which the learning rate decays to 0 (cosine); before it the rate "
        f"holds at its peak; 1: decay from the first step (default: {default('decay_fraction')})",
    )
    group.add_argument(
        "--clip-grad-norm",
        type=float,
        help=f"gradient clipping norm, 0 disables (default: {default('clip_grad_norm')})",
    )
    group.add_argument(
        "--label-smoothing", type=float, help=f"cross-entropy label smoothing (default: {default('label_smoothing')})"
    )
    group.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="fpt, fpt+, side-only: recompute each side block in backward instead of keeping its activations "
        "(the same results, about half of FPT's training memory, a slower step) "
        f"(default: {'on' if default('grad_checkpointing') else 'off'})",
    )
    group.add_argument("--balanced", action="store_true", help="weight the loss by inverse class frequency")
    group.add_argument(
        "--prior-bias",
        action=argparse.BooleanOptionalAction,
        help="start the classifier's bias at the log of the training split's class frequencies, so that the first "
        f"prediction is the class prior (default: {'on' if default('prior_bias') else 'off'})",
    )
    group.add_argument(
        "--metric",
        choices=METRIC_NAMES,
        help=f"validation metric that picks the best checkpoint (default: {default('selection_metric')})",
    )
    group.add_argument(
        "--crop-scale",
        type=_float_pair,
        metavar="A,B",
        help=f"random-resized-crop scale (default: {_pair(augmentation.crop_scale)})",
    )
    group.add_argument(
        "--crop-ratio",
        type=_float_pair,
        metavar="A,B",
        help=f"random-resized-crop ratio (default: {_pair(augmentation.crop_ratio)})",
    )
    group.add_argument(
        "--hflip", type=float, metavar="P", help=f"horizontal flip probability (default: {augmentation.hflip})"
    )
    group.add_argument("--brightness", type=float, help=f"brightness jitter (default: {augmentation.brightness})")
    group.add_argument("--contrast", type=float, help=f"contrast jitter (default: {augmentation.contrast})")


TRAINING_OPTIONS = {  # TrainingConfig field: parsed option (absent from commands that do not offer it)
    "epochs": "epochs",
    "min_steps": "min_steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "weight_decay_scope": "weight_decay_scope",
    "fusion_lr_scale": "fusion_lr_scale",
    "warmup_epochs": "warmup_epochs",
    "decay_fraction": "decay_fraction",
    "label_smoothing": "label_smoothing",
    "prior_bias": "prior_bias",
    "selection_metric": "metric",
    "seed": "seed",
    "device": "device",
    "precision": "precision",
    "grad_checkpointing": "grad_checkpointing",
    "num_workers": "workers",
    "cache_dtype": "cache_dtype",
    "cache_compression": "cache_compression",
    "normalization": "norm",
    "val_fraction": "val_fraction",
    "test_fraction": "test_fraction",
    "decoded_images_mib": "decoded_images_mib",
}
AUGMENTATION_OPTIONS = ("crop_scale", "crop_ratio", "hflip", "brightness", "contrast")


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The training config of the parsed options; unset ones keep ``TrainingConfig``'s defaults, except the
    feature cache, which the command line keeps in ``fpt-cache`` unless told otherwise."""

    def given(options: dict[str, str]) -> dict[str, object]:
        values = {name: getattr(args, option, None) for name, option in options.items()}
        return {name: value for name, value in values.items() if value is not None}

    options = {**recipe_training(getattr(args, "recipe", "default")), **given(TRAINING_OPTIONS)}
    clip = getattr(args, "clip_grad_norm", None)
    if clip is not None:
        options["clip_grad_norm"] = clip or None
    options["cache_dir"] = None if getattr(args, "no_cache", False) else args.cache or DEFAULT_CACHE
    augmentation = Augmentation(**given({name: name for name in AUGMENTATION_OPTIONS}))
    return TrainingConfig(
        **options,
        balanced_class_weights=getattr(args, "balanced", False),
        images_outside_root=getattr(args, "images_outside_root", False),
        augmentation=augmentation,
    )


def _run_info(args: argparse.Namespace) -> int:
    with _importing_library():
        import torch

        from fpt.info import format_model_info, model_info
        from fpt.models.build import build_model

    with torch.device("meta"):  # counting needs shapes only: no memory, no random initialisation of a large LPM
        info = model_info(build_model(config_from_args(args), pretrained_lpm=False))
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_model_info(info))
    return 0


def _run_preload(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.distributed import ranks
        from fpt.preload import preload
        from fpt.render import mib
        from fpt.task import prepare

    config = config_from_args(args)
    if not config.cacheable:
        raise FPTError(f"--method {args.method} has no LPM features to preload; only {cacheable_methods()} do")
    training = training_config_from_args(args)
    dataset, model, normalization = prepare(args.data, config, training)
    summary = preload(model, dataset, normalization, training, overwrite=args.overwrite)
    if not ranks().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    print(
        f"cache {summary.cache_dir}: {summary.computed} images computed, {summary.reused} already cached, "
        f"{mib(summary.bytes_on_disk)} on disk, {summary.seconds:.1f} s"
    )
    return 0


def _run_train(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.distributed import ranks
        from fpt.render import metrics_table
        from fpt.run import REPORT_FILE
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
    if not ranks().is_main:  # under torchrun, rank 0 reports for the job
        return 0
    print(metrics_table({"best": results.best, "last": results.last}))
    print(f"run written to {run_dir} (report: {run_dir / REPORT_FILE})")
    return 0


def _options_given_with_resume(args: argparse.Namespace) -> list[str]:
    """Options that ``--resume`` would ignore, as the user typed them (any value other than the parser's own
    default counts as given)."""
    defaults = vars(build_parser().parse_args(["train", "--resume", args.resume]))
    allowed = {"resume", "device", "workers", "handler", "traceback"}
    given = [name for name, value in vars(args).items() if name not in allowed and value != defaults[name]]
    return ["DATA" if name == "data" else f"--{name.replace('_', '-')}" for name in given]


def _run_evaluate(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.evaluate import evaluate_run
        from fpt.render import metrics_table

    metrics = evaluate_run(args.run_dir, split=args.split, checkpoint=args.checkpoint, device=args.device)
    print(json.dumps(metrics, indent=2) if args.json else metrics_table({f"{args.checkpoint} ({args.split})": metrics}))
    return 0


def _run_cache_info(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.cache import FeatureCache
        from fpt.render import mib

    info = FeatureCache.open(args.cache_dir).info()
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    parts = ", ".join(f"{name} {list(shape)}" for name, shape in info.layout["parts"].items())
    compressed = f", {info.layout['compression']}-compressed" if "compression" in info.layout else ""
    legacy = f"{info.legacy_entries:,} from an older fpt, without content hashes: the next preload recomputes them"
    rows = [
        ("cache", info.directory),
        ("entries", f"{info.entries:,}" + (f" ({legacy})" if info.legacy_entries else "")),
        ("record", f"{parts} in {info.layout['dtype']}, {info.record_bytes:,} bytes{compressed}"),
        ("on disk", mib(info.bytes_on_disk)),
        *((key, json.dumps(value)) for key, value in info.fingerprint.items()),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))
    return 0


def _run_cache_verify(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.cache import FeatureCache

    cache = FeatureCache.open(args.cache_dir)
    corrupt = cache.verify(progress=True)
    if not corrupt:
        print(f"{len(cache):,} records verified in {args.cache_dir}: none corrupt")
        return 0
    shown = ", ".join(corrupt[:5]) + (f" and {len(corrupt) - 5} more" if len(corrupt) > 5 else "")
    print(
        f"{len(corrupt):,} corrupt records dropped from {args.cache_dir} ({shown}); {len(cache):,} verified; "
        "the next `fpt preload` or `fpt train` recomputes them"
    )
    return 1


def _run_predict(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.predict import predict_images, prediction_rows

    if args.csv and not Path(args.csv).resolve().parent.is_dir():
        raise FPTError(f"--csv {args.csv}: its folder does not exist; create it or pass another path")
    predictions = predict_images(
        args.run_dir, args.images, checkpoint=args.checkpoint, device=args.device, explain_dir=args.explain
    )
    rows = prediction_rows(args.run_dir, predictions)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    if args.explain:
        print(f"prompt-attention overlays written to {args.explain}")
    return 0


def _run_synth(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.data.synthetic import write_dataset

    options = {"grades": args.grades, "class_ratio": args.class_ratio, "image_format": args.format}
    options |= {"lesion_scale": args.lesion_scale, "lesion_count": args.lesion_count}
    task = SynthTask(**{name: value for name, value in options.items() if value is not None})
    counts = {"train": args.train, "val": args.val, "test": args.test}
    root = write_dataset(args.out, counts, args.first_seed, args.size, task=task)
    print(f"wrote {args.train + args.val + args.test} images to {root} (folders and labels.csv)")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.demo import run_demo

    run_demo(args.out, DemoSettings(epochs=args.epochs, lr=args.lr, seed=args.seed))
    return 0


def _run_bench_memory(args: argparse.Namespace) -> int:
    with _importing_library():
        import torch

        from fpt.bench.memory_benchmark import benchmark_memory_sweep, format_memory_table, write_memory_outputs

    progress = not args.json
    results = benchmark_memory_sweep(
        backbone_from_args(args),
        args.sweep_input_size or [args.input_size],
        args.batch_size,
        args.methods,
        meters=args.meters,
        device=args.device,
        num_classes=args.num_classes,
        cache_dtype=getattr(torch, args.cache_dtype),
        grad_checkpointing=args.grad_checkpointing,
        progress=progress,
    )
    written = write_memory_outputs(results, args.out, plot=args.plot, sweep=bool(args.sweep_input_size))
    if args.json:
        records = [result.to_dict() for result in results]
        print(json.dumps(records[0] if len(records) == 1 else {"sweep": records}, indent=2))
        return 0
    for result in results:
        print(format_memory_table(result) + "\n")
    for path in written:
        print(f"wrote {path}")
    return 0


def _run_bench_accuracy(args: argparse.Namespace) -> int:
    with _importing_library():
        from fpt.bench.accuracy_benchmark import RESULTS_JSON, RESULTS_TABLE, benchmark_accuracy, format_accuracy_table

    if sum(value is not None for value in (args.lr, args.lr_grid, args.lr_scales)) > 1:
        raise FPTError("give one of --lr, --lr-grid and --lr-scales")
    training = training_config_from_args(args)
    backbone = backbone_from_args(args)
    result = benchmark_accuracy(
        args.data,
        args.out,
        args.methods,
        backbone,
        args.input_size,
        training,
        lr_grid=args.lr_grid,
        lr_scales=args.lr_scales,
    )
    print(format_accuracy_table(result))
    out = Path(args.out)
    print(f"wrote {out / RESULTS_TABLE}, {out / RESULTS_JSON} and the runs in {out / 'runs'}")
    return 0


def _choice_list(allowed: Sequence[str], message: str):
    """An argparse type: a non-empty, comma-separated list of ``allowed`` names; ``message`` (formatted with
    ``text`` and the ``unknown`` names) is the usage error otherwise."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if not items or unknown:
            raise argparse.ArgumentTypeError(message.format(text=text, unknown=",".join(unknown) or "none given"))
        return items

    return parse


_METHOD_LIST = _choice_list(METHOD_VARIANTS, f"unknown method(s) {{unknown}}; choose from {','.join(METHOD_VARIANTS)}")


def _pair(values: tuple[float, float]) -> str:
    return ",".join(str(value) for value in values)


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _float_list(text: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def _float_pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(item) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got '{text}'") from None
    return low, high
