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
from fpt.data.images import pixels_to_float

ImageTransform = Callable[[Tensor], Tensor]


@dataclass
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


def lpm_view(size: int, normalization: Normalization, augmentation: Augmentation | None = None) -> ImageTransform:
    """[3, H, W] uint8, or float in [0, 1] -> [3, size, size], resized (in float) and normalised.

    Augmented (when ``augmentation`` is given) only for the baselines, which train through the LPM; FPT's LPM
    view never is, which is what makes its keys/values cacheable.
    """
    return T.Compose([pixels_to_float, *_geometry(size, augmentation), *_photometric(augmentation, normalization)])


def side_view(size: int, normalization: Normalization, augmentation: Augmentation | None) -> ImageTransform:
    """[3, H, W] uint8, or float in [0, 1] -> [3, size, size]; augmented when ``augmentation`` is given (training).

    8-bit pixels are cropped and resized as they are, then converted: the side view is made in every step, and
    this is several times faster than resizing a float copy of the full image (it differs by rounding only).
    """
    return T.Compose([*_geometry(size, augmentation), pixels_to_float, *_photometric(augmentation, normalization)])


def _geometry(size: int, augmentation: Augmentation | None) -> list[ImageTransform]:
    if augmentation is None:
        return [T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    return [
        T.RandomResizedCrop(size, scale=augmentation.crop_scale, ratio=augmentation.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(augmentation.hflip),
    ]


def _photometric(augmentation: Augmentation | None, normalization: Normalization) -> list[ImageTransform]:
    jitter = [] if augmentation is None else [T.ColorJitter(augmentation.brightness, augmentation.contrast)]
    return [*jitter, _normalize(normalization)]


def _normalize(normalization: Normalization) -> T.Normalize:
    return T.Normalize(normalization.mean, normalization.std)
