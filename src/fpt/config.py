"""One configuration dataclass per method; each round-trips through JSON (``config.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from fpt.errors import FPTError
from fpt.models.backbone import BackboneSpec
from fpt.models.frozen_encoder import IMPORTANCE_RULES, Importance

CONFIG_NAME = "config.json"


@dataclass
class MethodConfig:
    """What every method shares: the pre-trained backbone (the LPM), the task and the high resolution.

    Attributes:
        backbone: the pre-trained ViT (a ``BackboneSpec``, or just its name).
        num_classes: classes of the downstream task.
        lpm_input_size: side in pixels of the high-resolution image the LPM reads.
        class_names: names of the ``num_classes`` classes, in label order (stored with trained models).

    Class attributes describe how a method is trained:
        uses_lpm: it reads the LPM (its features or its forward pass).
        side_network: it trains a side network on a down-sampled view.
        cacheable: its LPM input is never augmented, so the LPM's features can be preloaded.
    """

    method: ClassVar[str]
    uses_lpm: ClassVar[bool] = True
    side_network: ClassVar[bool] = False
    cacheable: ClassVar[bool] = False

    backbone: BackboneSpec
    num_classes: int
    lpm_input_size: int = 512
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backbone, str):
            self.backbone = BackboneSpec(self.backbone)
        elif isinstance(self.backbone, dict):
            self.backbone = BackboneSpec.from_dict(self.backbone)
        for name in ("num_classes", "lpm_input_size"):
            _check_positive(self, name)
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise FPTError(f"{len(self.class_names)} class names given for {self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


@dataclass
class FPTConfig(MethodConfig):
    """Fine-grained Prompt Tuning (FPT, MICCAI 2024).

    Preset: every LPM layer tapped, 224 px side input, prompts of width d/8 with an up-projection to d.

    Attributes (besides ``MethodConfig``'s):
        side_input_size: side in pixels of the down-sampled image the side network reads.
        tapped_layers: LPM block indices whose keys/values are used; None means the method's preset.
        num_prompts: M, fine-grained prompts per tapped layer.
        token_ratio: fraction of the LPM's N tokens kept per head (T = int(N * token_ratio)).
        importance: token importance, "global" (mean attention received) or "cls" (CLS attention).
        prompt_dropout: dropout on the fused prompts.
        side_width_divisor: the side network's width is the LPM's width divided by this.
    """

    method: ClassVar[str] = "fpt"
    side_network: ClassVar[bool] = True
    cacheable: ClassVar[bool] = True

    side_input_size: int = 224
    tapped_layers: list[int] | None = None
    num_prompts: int = 16
    token_ratio: float = 0.2
    importance: Importance = "global"
    prompt_dropout: float = 0.5
    side_width_divisor: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tapped_layers is not None:
            self.tapped_layers = [int(layer) for layer in self.tapped_layers]
        for name in ("side_input_size", "num_prompts", "side_width_divisor"):
            _check_positive(self, name)
        if not 0.0 < self.token_ratio <= 1.0:
            raise FPTError(f"token_ratio must be in (0, 1], got {self.token_ratio}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise FPTError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.importance not in IMPORTANCE_RULES:
            raise FPTError(f"importance must be one of {IMPORTANCE_RULES}, got '{self.importance}'")

    def default_tapped_layers(self, depth: int) -> list[int]:
        """The preset's tapped layers for an LPM of ``depth`` blocks: all of them."""
        return list(range(depth))

    def resolved_tapped_layers(self, depth: int) -> list[int]:
        return list(self.tapped_layers) if self.tapped_layers is not None else self.default_tapped_layers(depth)


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
        return list(range(depth // 2, depth))


@dataclass
class SideOnlyConfig(FPTPlusConfig):
    """The FPT+ side network alone, without prompts and without the LPM: the control that shows what the
    down-sampled view carries by itself. Sized exactly like FPT+'s side network (the backbone's width,
    heads, patch size and tapped-layer count); fusion fields are unused.
    """

    method: ClassVar[str] = "side-only"
    uses_lpm: ClassVar[bool] = False
    cacheable: ClassVar[bool] = False


@dataclass
class FullFineTuningConfig(MethodConfig):
    """Full fine-tuning: every LPM weight and a new classifier head, trained at the high resolution."""

    method: ClassVar[str] = "full"


@dataclass
class LinearProbeConfig(MethodConfig):
    """Linear probing: the LPM frozen, only a new classifier head trained."""

    method: ClassVar[str] = "linear"


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
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise FPTError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")


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
        if not 0.0 <= self.dropout < 1.0:
            raise FPTError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


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


def _check_positive(config: MethodConfig, name: str) -> None:
    if getattr(config, name) < 1:
        raise FPTError(f"{name} must be a positive integer, got {getattr(config, name)}")


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build the config of ``data["method"]`` from a dict as written by ``to_dict``."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in METHOD_CONFIGS:
        raise FPTError(f"unknown method '{method}'; expected one of {sorted(METHOD_CONFIGS)}")
    config_class = METHOD_CONFIGS[method]
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FPTError(f"unknown {method} config fields: {', '.join(unknown)}")
    return config_class(**data)


def load_config(directory: str | Path) -> MethodConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FPTError(f"no {CONFIG_NAME} in {directory}: not a saved fpt model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FPTError(f"{path} is not valid JSON: {error}") from None
    return config_from_dict(data)
