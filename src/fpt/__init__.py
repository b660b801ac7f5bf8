"""fpt: Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification."""

__version__ = "0.1.0"

from fpt.config import FPTConfig, FPTPlusConfig, config_from_dict, load_config
from fpt.errors import BackboneError, FPTError
from fpt.models.backbone import BackboneSpec, load_backbone
from fpt.models.fpt import FPTModel

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "FPTConfig",
    "FPTError",
    "FPTModel",
    "FPTPlusConfig",
    "__version__",
    "config_from_dict",
    "load_backbone",
    "load_config",
]
