"""fpt: Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification.

The names below are imported on first use, so ``import fpt`` (and the command line's start-up) loads nothing
heavy until a model or a training function is actually needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fpt._version import __version__

if TYPE_CHECKING:
    from fpt.config import (
        AdapterConfig,
        BackboneSpec,
        FPTConfig,
        FPTPlusConfig,
        FullFineTuningConfig,
        LinearProbeConfig,
        LoRAConfig,
        SideOnlyConfig,
        TrainingConfig,
        VPTDeepConfig,
        config_from_dict,
        load_config,
    )
    from fpt.errors import BackboneError, FPTError
    from fpt.models.backbone import load_backbone
    from fpt.models.baselines import BaselineViT
    from fpt.models.build import build_model, load_model
    from fpt.models.fpt import FPTModel, SideOnlyModel

_EXPORTS = {
    "fpt.config": (
        "AdapterConfig",
        "BackboneSpec",
        "FPTConfig",
        "FPTPlusConfig",
        "FullFineTuningConfig",
        "LinearProbeConfig",
        "LoRAConfig",
        "SideOnlyConfig",
        "TrainingConfig",
        "VPTDeepConfig",
        "config_from_dict",
        "load_config",
    ),
    "fpt.errors": ("BackboneError", "FPTError"),
    "fpt.models.backbone": ("load_backbone",),
    "fpt.models.baselines": ("BaselineViT",),
    "fpt.models.build": ("build_model", "load_model"),
    "fpt.models.fpt": ("FPTModel", "SideOnlyModel"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

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
    "SideOnlyModel",
    "TrainingConfig",
    "VPTDeepConfig",
    "__version__",
    "build_model",
    "config_from_dict",
    "load_backbone",
    "load_config",
    "load_model",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'fpt' has no attribute '{name}'")
    return getattr(import_module(_MODULE_OF[name]), name)


def __dir__() -> list[str]:
    return __all__
