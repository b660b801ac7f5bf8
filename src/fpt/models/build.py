"""The registry of model classes: build any method's model from its config, or restore a trained one."""

from __future__ import annotations

from pathlib import Path

from fpt.config import MethodConfig, load_config
from fpt.models.base import WEIGHTS_NAME, TransferModel
from fpt.models.baselines import BASELINE_METHODS, BaselineViT
from fpt.models.fpt import FPTModel, SideOnlyModel
from fpt.models.linear_probe import LinearProbeModel

# one model class per method of fpt.config.METHOD_CONFIGS
MODEL_CLASSES: dict[str, type[TransferModel]] = {
    **dict.fromkeys(BASELINE_METHODS, BaselineViT),
    "linear": LinearProbeModel,
    "side-only": SideOnlyModel,
    "fpt": FPTModel,
    "fpt+": FPTModel,
}


def build_model(config: MethodConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> TransferModel:
    """The model of ``config``.

    Args:
        load_lpm: FPT/FPT+ and the linear probe only: build the frozen LPM; False reads only its geometry
            (training from a cache).
            The baselines always hold their LPM, which they train through.
        pretrained_lpm: load the LPM's pre-trained weights; False keeps a random init (for counting).
    """
    return MODEL_CLASSES[config.method].from_config(config, load_lpm=load_lpm, pretrained_lpm=pretrained_lpm)


def load_model(directory: str | Path, load_lpm: bool = True) -> TransferModel:
    """Restore a model written by ``save_pretrained``: its LPM from the backbone spec, then its trained weights."""
    directory = Path(directory)
    config = load_config(directory)
    model = build_model(config, load_lpm=load_lpm, pretrained_lpm=not config.trains_lpm)
    model.load_trainable_weights(directory / WEIGHTS_NAME)
    return model
