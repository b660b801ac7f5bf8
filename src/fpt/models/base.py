"""What every trainable method shares: saving and restoring its trainable weights next to its config."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fpt.config import MethodConfig
from fpt.errors import FPTError

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
    """A pre-trained LPM adapted to a task; only the parameters with ``requires_grad`` are trained and saved."""

    config: MethodConfig

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
