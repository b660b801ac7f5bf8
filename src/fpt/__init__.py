"""fpt: Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution medical image classification."""

__version__ = "0.1.0"

from fpt.config import FPTConfig, FPTPlusConfig, config_from_dict, load_config  # noqa: E402
from fpt.errors import BackboneError, FPTError  # noqa: E402
from fpt.models.backbone import BackboneSpec, load_backbone  # noqa: E402
from fpt.models.fpt import FPTModel  # noqa: E402

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
