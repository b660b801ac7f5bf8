"""Preloading (``fpt preload``): run the frozen LPM once over a dataset and store what the method reads of it:
the selected keys/values (FPT, FPT+) or a pooled embedding (the linear probe).

The LPM is frozen and its input never augmented, so each image's features are the same in every epoch:
computed once here, they are read from ``fpt.cache`` during training, which then never runs the LPM. The
cache's fingerprint records everything that determines them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fpt._version import __version__
from fpt.cache import FeatureCache, RecordLayout, file_stamp
from fpt.config import BackboneSpec, Precision, TrainingConfig, cacheable_methods
from fpt.data.datasets import ImageDataset
from fpt.data.loaders import SampleViews, collate, worker_count
from fpt.data.transforms import Normalization, lpm_view
from fpt.errors import FPTError
from fpt.models.base import TransferModel
from fpt.runtime import autocast, progress_bar, select_device


@dataclass
class PreloadSummary:
    cache_dir: Path
    computed: int
    reused: int
    bytes_on_disk: int
    seconds: float


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), independent of where it came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_fingerprint(
    backbone: BackboneSpec,
    weights_sha256: str,
    feature_settings: dict[str, Any],
    normalization: Normalization,
    dtype: str,
    precision: Precision,
) -> dict[str, Any]:
    """Everything that determines the cached features of an image (``feature_settings``: the method's own, from
    ``TransferModel.feature_settings``)."""
    return {
        "backbone": backbone.to_dict(),
        "weights_sha256": weights_sha256,
        **feature_settings,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "dtype": dtype,
        "precision": precision,
        "fpt_version": __version__,
    }


def preload(
    model: TransferModel,
    dataset: ImageDataset,
    normalization: Normalization,
    training: TrainingConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> PreloadSummary:
    """Run the frozen LPM of ``model`` once over every image of ``dataset`` into ``training.cache_dir``.

    Uses the training's cache dtype, batch size, workers, device and precision. Images already in the cache are
    skipped, so an interrupted preload resumes where it stopped. The model's LPM is moved to that device (in
    place: it is far too large to copy).
    """
    config = model.config
    if not config.cacheable:
        raise FPTError(f"{config.method} has no LPM features to preload; only {cacheable_methods()} train from a cache")
    if training.cache_dir is None:
        raise FPTError("preloading needs a cache directory (TrainingConfig.cache_dir, --cache DIR)")
    start = time.perf_counter()
    lpm = model.frozen_lpm()  # raises for a model built without its LPM
    target = select_device(training.device)
    effective_precision = training.precision if target.type == "cuda" else "fp32"  # autocast only runs on GPUs
    digest = weights_digest(lpm)
    fingerprint = cache_fingerprint(
        config.backbone, digest, model.feature_settings(), normalization, training.cache_dtype, effective_precision
    )
    layout = RecordLayout(model.feature_layout(), training.cache_dtype)
    cache = FeatureCache.create(training.cache_dir, fingerprint, layout, overwrite=overwrite)

    samples = {sample.path: sample for split in dataset.splits.values() for sample in split}
    with cache.writer() as writer:  # holds the cache's lock: a concurrent preload waits, then reuses our work
        missing = [samples[key] for key in cache.missing(list(samples), dataset.root)]
        lpm.to(target)
        views = SampleViews(dataset.root, missing, lpm_view=lpm_view(config.lpm_input_size, normalization))
        loader = DataLoader(
            views,
            batch_size=training.batch_size,
            num_workers=worker_count(training.num_workers),
            collate_fn=collate,
            pin_memory=target.type == "cuda",
        )
        bar = progress_bar(total=len(missing), unit="img", desc="preload", enabled=progress and bool(missing))
        with bar:
            for batch in loader:
                with autocast(target, training.precision):
                    features = model.preload_features(batch.to(target).lpm)
                paths = [missing[i].path for i in batch.index.tolist()]
                stamps = [file_stamp(dataset.root / path) for path in paths]
                writer.add(paths, features, stamps)
                bar.update(len(paths))
    return PreloadSummary(
        cache_dir=Path(training.cache_dir),
        computed=len(missing),
        reused=len(samples) - len(missing),
        bytes_on_disk=cache.size_on_disk(),
        seconds=time.perf_counter() - start,
    )
