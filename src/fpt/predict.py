"""Prediction with a trained run, and where its fine-grained prompts looked in the LPM."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import Tensor

from fpt.config import FPTConfig
from fpt.data.images import load_pixels, pixels_to_float
from fpt.data.loaders import Batch
from fpt.data.transforms import lpm_view, side_view
from fpt.errors import FPTError
from fpt.models.build import load_model
from fpt.models.fpt import FPTModel
from fpt.models.frozen_encoder import LPMFeatures
from fpt.run import Run
from fpt.runtime import autocast, progress_bar, select_device


@dataclass
class Prediction:
    path: str
    probabilities: list[float]
    predicted: str
    overlay: str | None = None  # the prompt-attention PNG, when explained


def prompt_attention_map(model: FPTModel, features: LPMFeatures, lpm_input_size: int) -> Tensor:
    """Attention mass per LPM patch from the fusion module's cross-attention, [B, g, g], each map max 1.

    Every prompt's attention over its layer's kept tokens is summed over prompts, heads and layers and
    scattered back to the tokens' positions; prefix tokens (CLS, registers) are left out.
    """
    geometry = model.geometry
    weights = model.fusion.attention_weights(features.keys).float()  # [B, L, H, M, T]
    mass = weights.sum(dim=3)  # [B, L, H, T]
    batch = mass.shape[0]
    num_tokens = geometry.num_tokens(lpm_input_size)
    per_token = mass.new_zeros(*mass.shape[:3], num_tokens).scatter_add_(-1, features.token_indices, mass)
    grid = lpm_input_size // geometry.patch_size
    per_patch = per_token.sum(dim=(1, 2))[:, geometry.num_prefix_tokens :].reshape(batch, grid, grid)
    return per_patch / per_patch.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def save_overlay(image: Tensor, attention: Tensor, path: Path, alpha: float = 0.45) -> None:
    """Blend a [g, g] attention map (upsampled, 'inferno' colours) over an RGB image [3, S, S] in [0, 1]."""
    size = image.shape[-1]
    heat = F.interpolate(attention[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    colours = colormaps["inferno"](heat.clamp(0, 1).numpy())[..., :3]
    blended = (1 - alpha) * image.permute(1, 2, 0).numpy() + alpha * colours
    Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8)).save(path)


def predict_images(
    run_dir: str | Path,
    images: Sequence[str | Path],
    checkpoint: str = "best",
    device: str | None = None,
    explain_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[Prediction]:
    """Class probabilities for each image with a run's trained weights (the LPM runs on the fly).

    With ``explain_dir``, also writes ``<image stem>_attention.png`` per image (numbered when stems repeat):
    where the prompts attended.
    """
    run = Run.load(run_dir)
    directory = run.require_checkpoint(checkpoint)
    target = select_device(device or run.training.device)
    model = load_model(directory).to(target).eval()
    config = model.config
    if explain_dir is not None and not isinstance(config, FPTConfig):
        raise FPTError(f"--explain needs fine-grained prompts (fpt, fpt+); this run trained {config.method}")
    to_lpm = lpm_view(config.lpm_input_size, run.normalization)
    to_side = side_view(config.side_input_size, run.normalization, augmentation=None) if config.side_network else None
    if explain_dir is not None:
        explain_dir = Path(explain_dir)
        explain_dir.mkdir(parents=True, exist_ok=True)
    predictions: list[Prediction] = []
    paths = [Path(image) for image in images]
    overlay_names = _unique_names([f"{path.stem}_attention.png" for path in paths])
    for start in progress_bar(range(0, len(paths), batch_size), enabled=progress, desc="predict", unit="batch"):
        chunk = paths[start : start + batch_size]
        pixels = [load_pixels(path) for path in chunk]
        lpm_batch = torch.stack([to_lpm(p) for p in pixels]).to(target) if config.uses_lpm else None
        side_batch = torch.stack([to_side(p) for p in pixels]).to(target) if to_side is not None else None
        # the labels are unknown here; logits never read them
        batch = Batch(label=torch.zeros(len(chunk), dtype=torch.long), index=torch.arange(len(chunk)))
        with torch.no_grad(), autocast(target, run.training.precision):
            if explain_dir is None:
                logits = model.logits(replace(batch, side=side_batch, lpm=lpm_batch))
            else:  # the LPM's features are needed twice: for the logits and for the attention map
                features = model.encode(lpm_batch)
                logits = model.logits(replace(batch, side=side_batch, keys=features.keys, values=features.values))
            probabilities = logits.float().softmax(dim=-1).cpu()
            attention = prompt_attention_map(model, features, config.lpm_input_size).cpu() if explain_dir else None
        for index, path in enumerate(chunk):
            row = probabilities[index].tolist()
            overlay = None
            if attention is not None:
                image = pixels_to_float(pixels[index])[None]
                resized = F.interpolate(image, size=lpm_batch.shape[-2:], mode="bilinear", antialias=True)
                overlay = explain_dir / overlay_names[start + index]
                save_overlay(resized[0], attention[index], overlay)
            predicted = config.class_names[int(np.argmax(row))]
            predictions.append(Prediction(str(path), row, predicted, str(overlay) if overlay else None))
    return predictions


def prediction_rows(run_dir: str | Path, predictions: Sequence[Prediction]) -> list[list[str]]:
    """A table of ``predictions`` with a header: image, predicted class, then one probability per class."""
    header = ["image", "predicted", *Run.load(run_dir).dataset.classes]
    return [header, *([p.path, p.predicted, *(f"{v:.4f}" for v in p.probabilities)] for p in predictions)]


def _unique_names(names: list[str]) -> list[str]:
    """The names, with _2, _3, ... before '_attention' where one is already taken."""
    taken: set[str] = set()
    unique = []
    for name in names:
        candidate, number = name, 1
        while candidate in taken:
            number += 1
            candidate = name.replace("_attention", f"_{number}_attention")
        taken.add(candidate)
        unique.append(candidate)
    return unique
