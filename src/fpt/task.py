"""A training task: the dataset, the model sized for its classes, and the input normalisation.

``prepare`` is the one place that turns a data path and the two configs into these; training, preloading and
the demo all start from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from fpt.config import MethodConfig, TrainingConfig
from fpt.data.datasets import ImageDataset, load_dataset
from fpt.data.images import unreadable_images
from fpt.data.loaders import dataset_normalization
from fpt.data.transforms import Normalization
from fpt.errors import FPTError
from fpt.models.backbone import backbone_mean_std, load_backbone
from fpt.models.base import TransferModel
from fpt.models.build import build_model
from fpt.runtime import seed_everything


class Task(NamedTuple):
    dataset: ImageDataset
    model: TransferModel
    normalization: Normalization


def prepare(data: str | Path, model_config: MethodConfig, training: TrainingConfig, progress: bool = True) -> Task:
    """Load the dataset, build the model for its classes (LPM included) and choose the normalisation.

    Seeds the global random generators with ``training.seed`` first (the model's initialisation depends on it).
    """
    seed_everything(training.seed)
    dataset = load_dataset(
        data, training.val_fraction, training.test_fraction, training.seed, training.images_outside_root
    )
    if dataset.ignored_summary() and progress:
        print(dataset.ignored_summary())
    unreadable = unreadable_images(dataset.root, [s.path for split in dataset.splits.values() for s in split])
    if unreadable:
        listed = "; ".join(f"{key} ({reason})" for key, reason in list(unreadable.items())[:5])
        more = f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise FPTError(
            f"{len(unreadable)} images of {dataset.root} cannot be read: {listed}{more}; replace them, or remove "
            "them from the dataset (their files, or their rows of the CSV)"
        )
    config = replace(model_config, num_classes=len(dataset.classes), class_names=dataset.classes)
    model = build_model(config)
    if training.normalization == "auto":
        train_paths = [str(dataset.root / s.path) for s in dataset.splits["train"]]
        normalization = dataset_normalization(train_paths, num_workers=training.num_workers)
    else:
        with torch.device("meta"):  # only the pre-training statistics are read
            normalization = Normalization(*backbone_mean_std(load_backbone(config.backbone, pretrained=False)))
    return Task(dataset, model, normalization)
