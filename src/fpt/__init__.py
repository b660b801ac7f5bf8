"""fpt: Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification."""

__version__ = "0.1.0"

from fpt.config import (
    AdapterConfig,
    FPTConfig,
    FPTPlusConfig,
    FullFineTuningConfig,
    LinearProbeConfig,
    LoRAConfig,
    SideOnlyConfig,
    VPTDeepConfig,
    config_from_dict,
    load_config,
)
from fpt.errors import BackboneError, FPTError
from fpt.models.backbone import BackboneSpec, load_backbone
from fpt.models.baselines import BaselineViT
from fpt.models.build import build_model, load_model
from fpt.models.fpt import FPTModel

__all__ = [
    "AdapterConfig",
    "BackboneError",
    "BackboneSpec",
    "BaselineViT",
    "FPTConfig",
    "FPTError",
    "FPTModel",
    "FPTPlusConfig",
    "FullFineTuningConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "SideOnlyConfig",
    "VPTDeepConfig",
    "__version__",
    "build_model",
    "config_from_dict",
    "load_backbone",
    "load_config",
    "load_model",
]
