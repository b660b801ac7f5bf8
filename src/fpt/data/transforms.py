"""The two views of every image.

For FPT the LPM view is only resized (square, bilinear, antialiased) and normalised, never augmented: this
is what makes its keys/values cacheable. The side view, and the LPM view of the baselines (which train
through the LPM), are augmented at training time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision.transforms.v2 as T
from torch import Tensor

from fpt.config import Augmentation

ImageTransform = Callable[[Tensor], Tensor]


@dataclass
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


def lpm_view(size: int, normalization: Normalization, augmentation: Augmentation | None = None) -> ImageTransform:
    """[3, H, W] in [0, 1] -> [3, size, size], resized and normalised.

    Augmented (when ``augmentation`` is given) only for the baselines, which train through the LPM; FPT's LPM
    view never is, which is what makes its keys/values cacheable.
    """
    return _view(size, normalization, augmentation)


def side_view(size: int, normalization: Normalization, augmentation: Augmentation | None) -> ImageTransform:
    """[3, H, W] in [0, 1] -> [3, size, size]; augmented when ``augmentation`` is given (training)."""
    return _view(size, normalization, augmentation)


def _view(size: int, normalization: Normalization, augmentation: Augmentation | None) -> ImageTransform:
    if augmentation is None:
        resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    else:
        resize = [
            T.RandomResizedCrop(size, scale=augmentation.crop_scale, ratio=augmentation.crop_ratio, antialias=True),
            T.RandomHorizontalFlip(augmentation.hflip),
            T.ColorJitter(brightness=augmentation.brightness, contrast=augmentation.contrast),
        ]
    return T.Compose([*resize, _normalize(normalization)])


def _normalize(normalization: Normalization) -> T.Normalize:
    return T.Normalize(normalization.mean, normalization.std)
