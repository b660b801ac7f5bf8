"""What can be configured: the backbone spec, one dataclass per method, the training settings, and the choices
each option takes.

This module is the bottom layer: it imports nothing heavier than the standard library (no torch), so the
command line can build its parser, help text and defaults from it in a fraction of a second. Every method
config round-trips through JSON (``config.json``); ``METHOD_CONFIGS`` is the registry of methods.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from fpt.errors import FPTError

CONFIG_NAME = "config.json"

Importance = Literal["global", "cls"]
IMPORTANCE_RULES: tuple[str, ...] = ("global", "cls")
PosEmbedResampling = Literal["timm", "hf", "dino"]
POS_EMBED_RESAMPLINGS: tuple[str, ...] = ("timm", "hf", "dino")
Pooling = Literal["cls", "mean", "cls+mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls+mean")
FeatureNorm = Literal["standardize", "none"]
FEATURE_NORMS: tuple[str, ...] = ("standardize", "none")
Precision = Literal["fp32", "bf16", "fp16"]
AttentionInit = Literal["xavier", "trunc_normal"]
ATTENTION_INITS: tuple[str, ...] = ("xavier", "trunc_normal")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
CACHE_DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "int8")
CACHE_COMPRESSIONS: tuple[str, ...] = ("none", "zstd")  # of each cache record, lossless
NORMALIZATIONS: tuple[str, ...] = ("backbone", "auto")
METRIC_NAMES: tuple[str, ...] = ("auc", "accuracy", "balanced_accuracy", "f1", "precision", "recall", "kappa")
METERS: tuple[str, ...] = ("measured", "simulated")
WEIGHT_DECAY_SCOPES: tuple[str, ...] = ("all", "weights")
DEFAULT_EPOCHS = 20  # the official code's; the default schedule runs at least this many


DEMO_BACKBONE = "fpt:demo"  # the demo LPM shipped with the package, wherever it is installed


def is_local_path(name: str) -> bool:
    """True when a backbone name is a path on this machine rather than a model name."""
    return name != DEMO_BACKBONE and (name.startswith((".", "/", "~")) or Path(name).expanduser().exists())


@dataclass
class BackboneSpec:
    """What to build as the LPM.

    Attributes:
        name: a timm model name, optionally with its pretrained tag
            (``vit_base_patch16_384.orig_in21k_ft_in1k``); a timm Hub model (``hf-hub:timm/...``);
            a Hugging Face ``ViTModel`` repo id (``google/vit-base-patch16-384``); a local directory
            holding a timm or Hugging Face ViT checkpoint (``config.json`` + weights); or ``fpt:demo``, the
            demo LPM shipped with the package (recorded by name, so runs and caches outlive a reinstall).
        weights: a local weights file (.safetensors, .pth, .pt, .bin) for the timm architecture ``name``.
            When given, nothing is downloaded.
        model_kwargs: extra timm constructor arguments (``depth``, ``embed_dim``, ...), for timm names.
        pos_embed_resampling: how a ViT's position embeddings are resampled to the input grid: "timm" (bicubic
            with antialiasing, timm's), "hf" (bicubic to the grid size without antialiasing, transformers' ViT's)
            or "dino" (bicubic by the scale factor (grid + 0.1) / pre-trained grid without antialiasing, as DINO,
            older transformers and so the official FPT code do).
    """

    name: str
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed_resampling: PosEmbedResampling = "timm"

    def __post_init__(self) -> None:
        if self.pos_embed_resampling not in POS_EMBED_RESAMPLINGS:
            raise FPTError(
                f"pos_embed_resampling must be one of {', '.join(POS_EMBED_RESAMPLINGS)}, got "
                f"'{self.pos_embed_resampling}'"
            )

    def with_absolute_paths(self) -> BackboneSpec:
        """The same spec with local paths made absolute, so that saved runs work from any directory."""
        name = str(Path(self.name).expanduser().resolve()) if is_local_path(self.name) else self.name
        weights = str(Path(self.weights).expanduser().resolve()) if self.weights else None
        return replace(self, name=name, weights=weights, model_kwargs=dict(self.model_kwargs))

    def to_dict(self) -> dict[str, Any]:
        """The fields; the default resampling is left out, so that specs (and cache fingerprints) written before
        the field existed stay equal."""
        data = asdict(self)
        if data["pos_embed_resampling"] == "timm":
            del data["pos_embed_resampling"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**data)


@dataclass
class MethodConfig:
    """What every method shares: the pre-trained backbone (the LPM), the task and the high resolution.

    Attributes:
        backbone: the pre-trained ViT (a ``BackboneSpec``, or just its name).
        num_classes: classes of the downstream task.
        lpm_input_size: side in pixels of the high-resolution image the LPM reads.
        class_names: names of the ``num_classes`` classes, in label order (stored with trained models).

    Class attributes describe how a method is trained (the training loop, the data pipeline and
    ``fpt info`` read these, never the method's name):
        uses_lpm: it reads the LPM (its features or its forward pass).
        side_network: it trains a side network on a down-sampled view.
        cacheable: its LPM input is never augmented, so the LPM's features can be preloaded.
        trains_lpm: every LPM weight is trained (and saved), so the pre-trained ones need not be read on loading.
        retired_fields: fields that earlier versions wrote into ``config.json`` but the method never used; they
            are dropped on loading, so those models and runs still load.
        legacy_defaults: values of fields that earlier versions did not write, for a ``config.json`` without them
            (where today's default would describe another model).
        default_lr: the peak learning rate a run of the method gets when ``TrainingConfig.lr`` is None (the
            methods that train through the LPM keep the common 1e-4; see BENCHMARKS.md for the others).
        default_min_steps: the least number of optimizer steps a run of the method gets when
            ``TrainingConfig.min_steps`` is None (0 for the methods that train through the LPM, whose every
            step runs it; BENCHMARKS.md for the others).
    """

    method: ClassVar[str]
    uses_lpm: ClassVar[bool] = True
    side_network: ClassVar[bool] = False
    cacheable: ClassVar[bool] = False
    trains_lpm: ClassVar[bool] = False
    retired_fields: ClassVar[tuple[str, ...]] = ()
    legacy_defaults: ClassVar[dict[str, Any]] = {}
    default_lr: ClassVar[float] = 1e-4
    default_min_steps: ClassVar[int] = 0

    backbone: BackboneSpec
    num_classes: int
    lpm_input_size: int = 512
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backbone, str):
            self.backbone = BackboneSpec(self.backbone)
        elif isinstance(self.backbone, dict):
            self.backbone = BackboneSpec.from_dict(self.backbone)
        _check_positive(self, "num_classes", "lpm_input_size")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise FPTError(f"{len(self.class_names)} class names given for {self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self), "backbone": self.backbone.to_dict()}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class SideNetworkConfig(MethodConfig):
    """What every method with a side network shares (FPT, FPT+ and the side-only control).

    Attributes (besides ``MethodConfig``'s):
        side_input_size: side in pixels of the down-sampled image the side network reads.
        tapped_layers: LPM block indices whose keys/values are used; the side network has one block per
            tapped layer. None means the method's preset.
        side_width_divisor: the side network's width is the LPM's width divided by this.
        side_attention_init: how the side blocks' attention projections (qkv and output) start: "xavier"
            (Xavier-uniform) or "trunc_normal" (std 0.02 like the other weights: the official code's, which
            holds the loss at the class prior for several epochs; BENCHMARKS.md).
    """

    side_network: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-3  # the official 1e-4 leaves FPT+ at the class prior on small data
    default_min_steps: ClassVar[int] = 500  # 20 epochs of a few hundred images end soon after the plateau
    # configs written before this field existed started the side attention as the official code does
    legacy_defaults: ClassVar[dict[str, Any]] = {"side_attention_init": "trunc_normal"}

    side_input_size: int = 128
    tapped_layers: list[int] | None = None
    side_width_divisor: int = 8
    side_attention_init: AttentionInit = "xavier"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tapped_layers is not None:
            self.tapped_layers = [int(layer) for layer in self.tapped_layers]
        _check_positive(self, "side_input_size", "side_width_divisor")
        if self.side_attention_init not in ATTENTION_INITS:
            raise FPTError(
                f"side_attention_init must be one of {', '.join(ATTENTION_INITS)}, got '{self.side_attention_init}'"
            )

    def default_tapped_layers(self, depth: int) -> list[int]:
        """The preset's tapped layers for an LPM of ``depth`` blocks: the last half (FPT+'s)."""
        return _last_half(depth)

    def resolved_tapped_layers(self, depth: int) -> list[int]:
        return list(self.tapped_layers) if self.tapped_layers is not None else self.default_tapped_layers(depth)


@dataclass
class FPTConfig(SideNetworkConfig):
    """Fine-grained Prompt Tuning (FPT, MICCAI 2024).

    Preset: every LPM layer tapped, 224 px side input, prompts of width d/8 with an up-projection to d.

    Attributes (besides ``SideNetworkConfig``'s):
        num_prompts: M, fine-grained prompts per tapped layer.
        token_ratio: fraction of the candidate tokens kept per head (T = int(N * token_ratio), N the LPM's tokens
            less its registers unless ``select_registers``).
        importance: token importance, "global" (mean attention received) or "cls" (CLS attention).
        select_registers: the LPM's register tokens (DINOv2/DINOv3 ``reg`` models) are candidates for the kept
            tokens too; by default they are not (global sinks, not image regions). The CLS token always is.
        prompt_dropout: dropout on the fused prompts (the official code's 0.5 slows the start; BENCHMARKS.md).
    """

    method: ClassVar[str] = "fpt"
    cacheable: ClassVar[bool] = True
    # fpt 0.x before this field kept register tokens like image tokens
    legacy_defaults: ClassVar[dict[str, Any]] = {**SideNetworkConfig.legacy_defaults, "select_registers": True}

    side_input_size: int = 224
    num_prompts: int = 16
    token_ratio: float = 0.2
    importance: Importance = "global"
    select_registers: bool = False
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "num_prompts")
        if not 0.0 < self.token_ratio <= 1.0:
            raise FPTError(f"token_ratio must be in (0, 1], got {self.token_ratio}")
        _check_probability(self, "prompt_dropout")
        if self.importance not in IMPORTANCE_RULES:
            raise FPTError(f"importance must be one of {IMPORTANCE_RULES}, got '{self.importance}'")

    def default_tapped_layers(self, depth: int) -> list[int]:
        """Every LPM block."""
        return list(range(depth))


@dataclass
class FPTPlusConfig(FPTConfig):
    """FPT+ (TNNLS 2025).

    Preset: the last half of the LPM layers tapped (6-11 of 12), 128 px side input, prompts of width d
    with a LayerNorm and no up-projection. Other fields as in ``FPTConfig``.
    """

    method: ClassVar[str] = "fpt+"

    side_input_size: int = 128

    def default_tapped_layers(self, depth: int) -> list[int]:
        """The last half of the LPM's blocks."""
        return _last_half(depth)


@dataclass
class SideOnlyConfig(SideNetworkConfig):
    """The FPT+ side network alone, without prompts and without the LPM: the control that shows what the
    down-sampled view carries by itself. Sized exactly like FPT+'s side network (the backbone's width,
    heads, patch size and tapped-layer count); it has no fusion fields.
    """

    method: ClassVar[str] = "side-only"
    uses_lpm: ClassVar[bool] = False
    # fpt 0.1.0 derived this config from FPT+'s and saved its fusion fields too
    retired_fields: ClassVar[tuple[str, ...]] = ("num_prompts", "token_ratio", "importance", "prompt_dropout")


@dataclass
class FullFineTuningConfig(MethodConfig):
    """Full fine-tuning: every LPM weight and a new classifier head, trained at the high resolution."""

    method: ClassVar[str] = "full"
    trains_lpm: ClassVar[bool] = True


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probing: a linear classifier on one pooled embedding per image from the frozen LPM (the
    practitioners' baseline). The LPM's input is never augmented, so the embeddings are preloaded like FPT's
    keys/values, and training reads a few KB per image.

    Attributes:
        pooling: the embedding, from the LPM's final (normalised) tokens: "cls" (the CLS token), "mean" (the
            mean of the patch tokens) or "cls+mean" (both, concatenated: twice the LPM's width).
        feature_norm: "standardize" (each embedding dimension to zero mean and unit variance over the training
            embeddings, as a logistic regression on standardised features; the statistics are kept with the
            weights) or "none" (the raw embedding).
    """

    method: ClassVar[str] = "linear"
    cacheable: ClassVar[bool] = True
    default_lr: ClassVar[float] = 1e-2  # the best mean validation AUC of the standardised probe on the panel
    default_min_steps: ClassVar[int] = 500  # the schedule FPT+ gets, so that the two compare alike
    # fpt 0.1.0 trained the LPM's own head on its CLS token and wrote no pooling field; older configs have no
    # feature_norm field and were trained on the raw embedding
    legacy_defaults: ClassVar[dict[str, Any]] = {"pooling": "cls", "feature_norm": "none"}

    pooling: Pooling = "cls+mean"
    feature_norm: FeatureNorm = "standardize"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pooling not in POOLINGS:
            raise FPTError(f"pooling must be one of {POOLINGS}, got '{self.pooling}'")
        if self.feature_norm not in FEATURE_NORMS:
            raise FPTError(f"feature_norm must be one of {FEATURE_NORMS}, got '{self.feature_norm}'")


@dataclass
class VPTDeepConfig(MethodConfig):
    """Deep visual prompt tuning (VPT-deep): new learnable prompt tokens in front of every LPM block.

    Attributes:
        num_prompts: prompt tokens per block.
        prompt_dropout: dropout on the prompts.
    """

    method: ClassVar[str] = "vpt-deep"

    num_prompts: int = 10
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "num_prompts")
        _check_probability(self, "prompt_dropout")


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA on every block's attention qkv projection: ``qkv(x) + (alpha / rank) B A x``, B starting at zero.

    Attributes:
        rank: rank r of the update.
        alpha: scale numerator (the update is scaled by alpha / rank).
        dropout: dropout on the input of the low-rank path.
    """

    method: ClassVar[str] = "lora"

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "rank")
        _check_probability(self, "dropout", "LoRA dropout")


@dataclass
class AdapterConfig(MethodConfig):
    """Adapter tuning: a bottleneck adapter ``h + up(GELU(down(h)))`` after the MLP of every LPM block.

    Attributes:
        bottleneck_dim: the adapter's hidden width (``up`` starts at zero, so training starts from the LPM).
    """

    method: ClassVar[str] = "adapter"

    bottleneck_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "bottleneck_dim")


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    config.method: config
    for config in (
        FullFineTuningConfig,
        LinearProbeConfig,
        VPTDeepConfig,
        LoRAConfig,
        AdapterConfig,
        SideOnlyConfig,
        FPTConfig,
        FPTPlusConfig,
    )
}

NO_CACHE = "/no-cache"
# every method, and the cacheable ones once more with their LPM run in every step instead of cached
METHOD_VARIANTS: tuple[str, ...] = (
    *METHOD_CONFIGS,
    *(f"{name}{NO_CACHE}" for name, config in METHOD_CONFIGS.items() if config.cacheable),
)


def cacheable_methods() -> str:
    """The methods that train from a feature cache, for messages: "linear, fpt and fpt+"."""
    names = [name for name, config in METHOD_CONFIGS.items() if config.cacheable]
    return ", ".join(names[:-1]) + f" and {names[-1]}"


def method_variant(name: str) -> tuple[type[MethodConfig], bool]:
    """The config class of a ``METHOD_VARIANTS`` name and whether it trains from the feature cache."""
    if name not in METHOD_VARIANTS:
        raise FPTError(f"unknown method '{name}'; choose from {', '.join(METHOD_VARIANTS)}")
    config_class = METHOD_CONFIGS[name.removesuffix(NO_CACHE)]
    return config_class, config_class.cacheable and not name.endswith(NO_CACHE)


def check_method_variants(names: list[str] | tuple[str, ...]) -> None:
    """Refuse an empty list or a name outside ``METHOD_VARIANTS`` (all unknown names in one message)."""
    if not names:
        raise FPTError("give at least one method")
    unknown = [name for name in names if name not in METHOD_VARIANTS]
    if unknown:
        raise FPTError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_VARIANTS)}")


def _last_half(depth: int) -> list[int]:
    return list(range(depth // 2, depth))


def _check_positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise FPTError(f"{name} must be a positive integer, got {getattr(config, name)}")


def _check_probability(config: Any, name: str, label: str | None = None) -> None:
    if not 0.0 <= getattr(config, name) < 1.0:
        raise FPTError(f"{label or name} must be in [0, 1), got {getattr(config, name)}")


def _known_fields(config_class: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` if every key is a field of ``config_class``; unknown keys are refused, never dropped silently."""
    unknown = sorted(set(data) - {f.name for f in fields(config_class)})
    if unknown:
        raise FPTError(f"unknown {what} fields: {', '.join(unknown)}")
    return data


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build the config of ``data["method"]`` from a dict as written by ``to_dict``."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHOD_CONFIGS:
        raise FPTError(f"unknown method '{method}'; expected one of {sorted(METHOD_CONFIGS)}")
    config_class = METHOD_CONFIGS[method]
    data = {key: value for key, value in data.items() if key not in config_class.retired_fields}
    data = {**config_class.legacy_defaults, **data}
    return config_class(**_known_fields(config_class, data, f"{method} config"))


def load_config(directory: str | Path) -> MethodConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FPTError(f"no {CONFIG_NAME} in {directory}: not a saved fpt model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FPTError(f"{path} is not valid JSON: {error}") from None
    return config_from_dict(data)


@dataclass
class Augmentation:
    """Training-time augmentation of the side view (FPT) or of the high-resolution view (the baselines): a
    random resized crop from the original image, a horizontal flip, brightness and contrast jitter."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.7, 1.3)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)


@dataclass
class TrainingConfig:
    """How to train; where a default differs from the official code's (``--recipe paper``), BENCHMARKS.md has the
    ablation behind it.

    Attributes:
        epochs: schedule length; None means the method's schedule: ``DEFAULT_EPOCHS`` (20), raised on a small
            training set to the method's ``default_min_steps`` optimizer steps.
        batch_size: images per optimizer step.
        lr: peak learning rate; None means the method's own (``default_lr`` of its config: 1e-3 for FPT, FPT+
            and the side-only control, 1e-2 for the linear probe, 1e-4 for the methods that train through the
            LPM), resolved when training starts and recorded in the run.
        min_steps: the schedule runs at least this many optimizer steps: on a small training set the epochs are
            raised to reach it (0: exactly ``epochs``). None means the method's own (``default_min_steps`` of its
            config: 500 for FPT, FPT+, the side-only control and the linear probe, 0 for the methods that train
            through the LPM) when ``epochs`` is None too, and 0 when ``epochs`` is given (an epoch count asked
            for is kept). Both are resolved when training starts and recorded in the run.
        weight_decay, betas: AdamW settings.
        weight_decay_scope: "all" decays every trainable parameter (the official code); "weights" only the
            weight matrices of linear and convolution layers, not prompts, tokens, position embeddings, norms
            or biases.
        fusion_lr_scale: the fusion module's (the prompts' and their projections') learning rate relative to
            ``lr``; the side network keeps ``lr``.
        warmup_epochs: linear warm-up before the per-iteration cosine decay (may be fractional).
        decay_fraction: the last share of the schedule (after any warm-up) over which the learning rate decays
            to 0 along a cosine; before it the rate holds at its peak. 1.0 (the official code): it decays from the
            first step.
        clip_grad_norm: gradient clipping threshold (None disables it).
        label_smoothing, balanced_class_weights: cross-entropy options.
        prior_bias: start the classifier's bias at the log of the training split's class frequencies (the model's
            first prediction is then the class prior, whatever the features; the same as zero on balanced classes).
        selection_metric: validation metric that picks the best checkpoint (higher is better).
        seed: seeds data splits, shuffling, augmentation, initialisation and dropout.
        device: "auto" (cuda > mps > cpu) or a torch device name.
        precision: "fp32", or "bf16"/"fp16" autocast on GPUs.
        grad_checkpointing: recompute each side block in backward instead of keeping its activations (FPT, FPT+
            and side-only): the same results for about half of FPT's training-step memory, at a slower step
            (BENCHMARKS.md, issue 12).
        num_workers: DataLoader workers (None: one per spare core, at most 4).
        cache_dir: feature cache directory (preloaded LPM features); None (the default for the API; the
            command line's is ``fpt-cache``) runs the LPM on the fly and writes nothing.
        cache_dtype: dtype of the cached features (keys/values or embeddings): float32, bfloat16, float16, or
            int8 (symmetric, a float16 scale per token of each layer and head, dequantised one layer at a time in
            the fusion module: a quarter of float32's bytes plus 2 per vector).
        cache_compression: "none", or "zstd": each record compressed losslessly (zstd level 3), which stores an
            int8 cache in about 93 % of its bytes (under a quarter of float32's), for about 1 ms per MB of record
            to decompress at each read. The features, and so the results, are the same.
        normalization: "backbone" (the LPM's pre-training mean/std) or "auto" (training-set statistics).
        augmentation: training-time augmentation of the side view (FPT) or of the high-resolution view
            (the baselines, which train through the LPM).
        val_fraction, test_fraction: shares moved out of train when a split is missing.
        images_outside_root: let a CSV list images outside its own folder (refused by default: such a path is
            easily a mistake, and an image reached by two spellings could sit in two splits).
        decoded_images_mib: decode a split's images once into memory when their pixels take at most this many
            MiB (8-bit images; 0: decode them in every epoch). The views and so the results are the same.
    """

    epochs: int | None = None
    min_steps: int | None = None
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay_scope: str = "all"
    fusion_lr_scale: float = 1.0
    warmup_epochs: float = 0.0
    decay_fraction: float = 1.0
    clip_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    balanced_class_weights: bool = False
    prior_bias: bool = False
    selection_metric: str = "auc"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "fp32"
    grad_checkpointing: bool = False
    num_workers: int | None = None
    cache_dir: str | None = None
    cache_dtype: str = "float16"
    cache_compression: str = "none"
    normalization: str = "backbone"
    augmentation: Augmentation = field(default_factory=Augmentation)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    images_outside_root: bool = False
    decoded_images_mib: int = 2048

    def __post_init__(self) -> None:
        if isinstance(self.augmentation, dict):
            self.augmentation = Augmentation(**self.augmentation)
        self.betas = tuple(self.betas)
        if self.selection_metric not in METRIC_NAMES:
            raise FPTError(f"selection metric must be one of {', '.join(METRIC_NAMES)}")
        if self.precision not in PRECISIONS:
            raise FPTError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.normalization not in NORMALIZATIONS:
            raise FPTError("normalization must be 'backbone' or 'auto'")
        if self.cache_dtype not in CACHE_DTYPE_NAMES:
            raise FPTError(f"cache dtype '{self.cache_dtype}' is not one of {', '.join(CACHE_DTYPE_NAMES)}")
        if self.cache_compression not in CACHE_COMPRESSIONS:
            raise FPTError(
                f"cache compression '{self.cache_compression}' is not one of {', '.join(CACHE_COMPRESSIONS)}"
            )
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise FPTError("epochs and batch size must be positive")
        if self.min_steps is not None and self.min_steps < 0:
            raise FPTError(f"min_steps must not be negative, got {self.min_steps}")
        finite = (self.lr or 1.0, self.weight_decay, self.warmup_epochs, self.fusion_lr_scale, self.label_smoothing)
        if not all(math.isfinite(value) for value in finite):
            raise FPTError("learning rate, weight decay, warm-up, fusion lr scale and label smoothing must be numbers")
        if (self.lr is not None and self.lr <= 0) or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise FPTError("learning rate must be positive, weight decay and warm-up not negative")
        if self.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
            raise FPTError(f"weight decay scope must be one of {', '.join(WEIGHT_DECAY_SCOPES)}")
        if not 0 < self.decay_fraction <= 1:
            raise FPTError(f"the decay fraction must be in (0, 1], got {self.decay_fraction}")
        if not self.fusion_lr_scale > 0:
            raise FPTError(f"the fusion learning-rate scale must be positive, got {self.fusion_lr_scale}")
        if not 0 <= self.label_smoothing < 1:
            raise FPTError("label smoothing must be in [0, 1)")
        if self.decoded_images_mib < 0:
            raise FPTError(f"decoded_images_mib must not be negative, got {self.decoded_images_mib}")
        if self.num_workers is not None and self.num_workers < 0:
            raise FPTError("--workers must not be negative")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise FPTError("gradient clipping norm must be positive (0 on the command line disables it)")
        augmentation = self.augmentation
        low, high = augmentation.crop_scale
        if not 0 < low <= high <= 1 or not 0 < augmentation.crop_ratio[0] <= augmentation.crop_ratio[1]:
            raise FPTError("crop scale must satisfy 0 < A <= B <= 1 and crop ratio 0 < A <= B")
        if not 0 <= augmentation.hflip <= 1 or augmentation.brightness < 0 or augmentation.contrast < 0:
            raise FPTError("flip probability must be in [0, 1] and jitter strengths not negative")

    def for_method(self, config_class: type[MethodConfig]) -> TrainingConfig:
        """These settings with the method's defaults filled in where None: the learning rate and the schedule."""
        if self.grad_checkpointing and not config_class.side_network:
            raise FPTError(
                f"{config_class.method} has no side network to recompute: drop --grad-checkpointing (it is for fpt, "
                "fpt+ and side-only)"
            )
        if self.min_steps is not None:
            min_steps = self.min_steps
        else:
            min_steps = config_class.default_min_steps if self.epochs is None else 0
        return replace(
            self,
            lr=config_class.default_lr if self.lr is None else self.lr,
            epochs=DEFAULT_EPOCHS if self.epochs is None else self.epochs,
            min_steps=min_steps,
        )

    def scheduled_epochs(self, steps_per_epoch: int) -> int:
        """The epochs to run (settings resolved by ``for_method``): ``epochs``, or more where that many are needed
        to reach ``min_steps`` steps."""
        if self.epochs is None or self.min_steps is None:
            raise FPTError("the schedule is known once the settings are resolved for a method (for_method)")
        return max(self.epochs, math.ceil(self.min_steps / max(1, steps_per_epoch)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        return cls(**_known_fields(cls, data, "training config"))


# The official code's settings (the papers' recipe), for reproducing the papers: ``--recipe paper``. Where fpt's
# defaults differ, BENCHMARKS.md has the ablation behind each difference.
PAPER_TRAINING: dict[str, Any] = {
    "epochs": DEFAULT_EPOCHS,
    "min_steps": 0,
    "lr": 1e-4,
    "weight_decay": 0.1,
    "weight_decay_scope": "all",
    "fusion_lr_scale": 1.0,
    "warmup_epochs": 0.0,
    "decay_fraction": 1.0,
    "prior_bias": False,
}
# fields of the side-network methods' configs (each gets those it has); prompts start at std 1e-6 in both
PAPER_MODEL: dict[str, Any] = {"prompt_dropout": 0.5, "side_attention_init": "trunc_normal"}
RECIPES: tuple[str, ...] = ("default", "paper")


def recipe_training(recipe: str) -> dict[str, Any]:
    """The ``TrainingConfig`` fields a recipe sets ("default": none, fpt's defaults; "paper": the official ones)."""
    _check_recipe(recipe)
    return dict(PAPER_TRAINING) if recipe == "paper" else {}


def recipe_model(recipe: str, config_class: type[MethodConfig]) -> dict[str, Any]:
    """The fields of ``config_class`` a recipe sets (the paper recipe: the side network's and the fusion's)."""
    _check_recipe(recipe)
    if recipe != "paper" or not issubclass(config_class, SideNetworkConfig):
        return {}
    accepted = {f.name for f in fields(config_class)}
    return {name: value for name, value in PAPER_MODEL.items() if name in accepted}


def _check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise FPTError(f"unknown recipe '{recipe}'; choose from {', '.join(RECIPES)}")


IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg")


@dataclass(frozen=True)
class SynthTask:
    """What a synthetic fundus task varies (``fpt synth``); the defaults are the demo's task.

    Attributes:
        grades: the lesion grades that occur (0 none, 1 mild, 2 moderate, 3 severe); ``(0, 1)`` is a binary
            task, lesions present or not.
        class_ratio: how often each grade occurs, as whole numbers (``(3, 1)``: three negatives per positive);
            None means equally often.
        lesion_scale: lesion radii relative to the demo's.
        lesion_count: lesion counts relative to the demo's (every lesion-bearing grade keeps at least one).
        image_format: "png" or "jpg" (quality 95).
    """

    grades: tuple[int, ...] = (0, 1, 2, 3)
    class_ratio: tuple[int, ...] | None = None
    lesion_scale: float = 1.0
    lesion_count: float = 1.0
    image_format: str = "png"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grades", tuple(int(grade) for grade in self.grades))
        if len(self.grades) < 2 or len(set(self.grades)) != len(self.grades) or not set(self.grades) <= {0, 1, 2, 3}:
            raise FPTError(f"grades must be two or more distinct grades out of 0-3, got {self.grades}")
        if self.class_ratio is not None:
            object.__setattr__(self, "class_ratio", tuple(int(count) for count in self.class_ratio))
            if len(self.class_ratio) != len(self.grades) or min(self.class_ratio) < 1:
                raise FPTError(f"class ratio needs one positive whole number per grade {self.grades}")
        if self.lesion_scale <= 0 or self.lesion_count <= 0:
            raise FPTError("lesion scale and lesion count must be positive")
        if self.image_format not in IMAGE_FORMATS:
            raise FPTError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got '{self.image_format}'")

    def label_cycle(self) -> tuple[int, ...]:
        """The grades in the order consecutive seeds take them (each repeated as its share of the ratio)."""
        ratio = self.class_ratio or (1,) * len(self.grades)
        return tuple(grade for grade, count in zip(self.grades, ratio, strict=True) for _ in range(count))


DEMO_SPLITS = {"train": 240, "val": 60, "test": 160}  # seeds 0-459; the LPM's pre-training used >= 1,000,000


@dataclass
class DemoSettings:
    """The built-in demo (``fpt demo``): training overrides, examples explained, split sizes.

    Both methods train with ``TrainingConfig``'s defaults, as a user's run does; ``epochs`` and ``lr`` override
    them only when set.
    """

    epochs: int | None = None
    lr: float | None = None
    seed: int = 0
    examples: int = 4
    splits: dict[str, int] = field(default_factory=lambda: dict(DEMO_SPLITS))


def default_value(config_class: type, name: str) -> Any:
    """The default of field ``name`` of a config dataclass (for help texts: one source of truth)."""
    for item in fields(config_class):
        if item.name == name:
            return item.default_factory() if callable(item.default_factory) else item.default
    raise KeyError(name)
