"""The two views of every image.

For FPT the LPM view is only resized (square, bilinear, antialiased) and normalised, never augmented: this
is what makes its keys/values cacheable. The side view, and the LPM view of the baselines (which train
through the LPM), are augmented at training time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2 as T
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fpt.data.images import load_image
from fpt.runtime import progress_bar

ImageTransform = Callable[[Tensor], Tensor]


@dataclass
class Augmentation:
    """Side-view augmentation at training time (random resized crop from the original image, flip, jitter)."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    crop_ratio: tuple[float, float] = (0.7, 1.3)
    hflip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)


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


class _ResizedImages(Dataset):
    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths = paths
        self.resize = T.Resize((size, size), antialias=True)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.resize(load_image(self.paths[index]))


def dataset_normalization(paths: Sequence[str], size: int = 224, num_workers: int = 0) -> Normalization:
    """Per-channel mean and std of the images at ``paths`` (resized to ``size``), for ``--norm auto``."""
    loader = DataLoader(_ResizedImages(paths, size), batch_size=32, num_workers=num_workers)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for batch in progress_bar(loader, desc="normalisation statistics", unit="batch", leave=False):
        total += batch.double().sum(dim=(0, 2, 3))
        squares += batch.double().pow(2).sum(dim=(0, 2, 3))
        count += batch.shape[0] * batch.shape[2] * batch.shape[3]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))
