"""What every trainable method shares: logits of a ``Batch``, and saving and restoring its trainable weights next
to its config."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fpt.config import MethodConfig
from fpt.data.loaders import Batch
from fpt.errors import FPTError
from fpt.models.frozen_encoder import LPMGeometry

WEIGHTS_NAME = "model.safetensors"


def check_input_size(option: str, size: int, patch_size: int) -> None:
    """Raise unless ``size`` (pixels, named ``option`` in the message) is a multiple of the patch size."""
    if size % patch_size:
        below = size - size % patch_size
        raise FPTError(
            f"{option} {size} is not a multiple of the LPM's patch size {patch_size}; "
            f"use {below} or {below + patch_size}"
        )


class TransferModel(nn.Module):
    """A pre-trained LPM adapted to a task; only the parameters with ``requires_grad`` are trained and saved.

    A method is a config class (``fpt.config``) plus a subclass of this one, registered in
    ``fpt.models.build.MODEL_CLASSES``; training, evaluation, prediction and the benchmarks only call the
    methods below.
    """

    config: MethodConfig
    geometry: LPMGeometry  # of the LPM the model was built for

    @classmethod
    def from_config(cls, config: MethodConfig, load_lpm: bool = True, pretrained_lpm: bool = True) -> TransferModel:
        """Build the model of ``config``.

        Args:
            load_lpm: hold the frozen LPM; False (for methods that train from cached features) reads only its
                geometry. Methods that train through the LPM always hold it.
            pretrained_lpm: load the LPM's pre-trained weights; False keeps a random init (for counting).
        """
        raise NotImplementedError

    def logits(self, batch: Batch) -> Tensor:
        """Logits [B, num_classes] of a batch (on the model's device) holding the inputs the method reads."""
        raise NotImplementedError

    def frozen_params(self) -> tuple[int, int]:
        """Frozen parameters held (the LPM's), and the same without the LPM's own classifier head."""
        raise NotImplementedError

    def classifier(self) -> nn.Linear:
        """The trained linear layer that gives the logits (``TrainingConfig.prior_bias`` starts its bias)."""
        raise NotImplementedError

    def feature_layout(self) -> dict[str, tuple[int, ...]]:
        """Cacheable methods: the named parts of one image's preloaded LPM features and their shapes."""
        raise FPTError(f"{self.config.method} has no LPM features to preload")

    def feature_settings(self) -> dict[str, Any]:
        """Cacheable methods: the config fields that determine the preloaded features (for the cache fingerprint)."""
        raise FPTError(f"{self.config.method} has no LPM features to preload")

    def preload_features(self, lpm_images: Tensor) -> dict[str, Tensor]:
        """Cacheable methods: run the frozen LPM on images [B, C, S, S] -> the parts of ``feature_layout``,
        [B, *shape] each."""
        raise FPTError(f"{self.config.method} has no LPM features to preload")

    def recording_features(self, lpm: nn.Module) -> AbstractContextManager[Callable[[], dict[str, Tensor]]]:
        """Cacheable methods: while open, every ``forward_features`` of ``lpm`` (the LPM this model's features come
        from, even one another model holds) records them; the yielded function returns those of the latest
        forward, as ``preload_features`` would. Several methods' caches can so share one LPM pass."""
        raise FPTError(f"{self.config.method} has no LPM features to preload")

    def frozen_lpm(self) -> nn.Module:
        """Cacheable methods: the frozen LPM module whose weights determine the features (for their digest)."""
        raise FPTError(f"{self.config.method} has no LPM features to preload")

    def drop_lpm(self) -> None:
        """Cacheable methods: release the frozen LPM; from here on the model reads preloaded features only."""
        raise FPTError(f"{self.config.method} trains through its LPM and cannot drop it")

    def join_empty_step(self) -> None:
        """Take part in a training step without a forward pass, on a rank whose share of the step's batch is empty
        (under torchrun): models whose training forward joins a collective join it here (none by default)."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the trained network's blocks in backward instead of keeping their activations (the same
        results, less memory, a slower step). Only methods with a side network have it."""
        if enable:
            raise FPTError(
                f"{self.config.method} has no gradient checkpointing; it is for the side network of fpt, fpt+ and "
                "side-only: drop --grad-checkpointing"
            )

    def diagnostics(self, batch: Batch) -> dict[str, float]:
        """Method-specific readings of the model on ``batch`` for the training log (none by default)."""
        return {}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The trained parameters, keyed as in ``state_dict()``."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def num_learnable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (with the backbone spec) and ``model.safetensors`` (trained weights only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        weights = {name: tensor.contiguous() for name, tensor in self.trainable_state_dict().items()}
        save_file(weights, directory / WEIGHTS_NAME, metadata={"method": self.config.method})

    def load_trainable_weights(self, path: str | Path) -> None:
        """Load weights written by ``save_pretrained``; every trainable parameter must be among them."""
        path = Path(path)
        try:
            state_dict = load_file(path)
        except (OSError, SafetensorError) as error:
            raise FPTError(f"cannot read trained weights {path}: {error}") from None
        mismatch = f"{path} does not match its config.json"
        try:
            _, unexpected = self.load_state_dict(state_dict, strict=False)
        except RuntimeError as error:  # a shape mismatch; torch lists them one per line
            raise FPTError(f"{mismatch}: {str(error).splitlines()[-1].strip()}") from None
        missing = sorted(set(self.trainable_state_dict()) - set(state_dict))
        if missing or unexpected:
            raise FPTError(f"{mismatch}: missing {missing[:4]}, unexpected {unexpected[:4]}")
