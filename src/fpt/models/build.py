"""Build any method's model from its config, or restore a trained one from its directory."""

from __future__ import annotations

from pathlib import Path

from fpt.config import FullFineTuningConfig, MethodConfig, load_config
from fpt.models.base import WEIGHTS_NAME, TransferModel
from fpt.models.baselines import BASELINE_METHODS, BaselineViT
from fpt.models.fpt import FPTModel


def build_model(config: MethodConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> TransferModel:
    """The model of ``config``.

    Args:
        load_lpm: FPT/FPT+ only: build the frozen LPM; False reads only its geometry (training from a cache).
            The baselines always hold their LPM, which they train through.
        pretrained_lpm: load the LPM's pre-trained weights; False keeps a random init (for counting).
    """
    if config.method in BASELINE_METHODS:
        return BaselineViT.from_config(config, pretrained_lpm=pretrained_lpm)
    return FPTModel.from_config(config, load_lpm=load_lpm, pretrained_lpm=pretrained_lpm)


def load_model(directory: str | Path, load_lpm: bool = True) -> TransferModel:
    """Restore a model written by ``save_pretrained``: its LPM from the backbone spec, then its trained weights."""
    directory = Path(directory)
    config = load_config(directory)
    # full fine-tuning saved every weight, so the pre-trained ones need not be read
    model = build_model(config, load_lpm=load_lpm, pretrained_lpm=not isinstance(config, FullFineTuningConfig))
    model.load_trainable_weights(directory / WEIGHTS_NAME)
    return model
