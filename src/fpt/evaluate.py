"""Evaluation (``fpt evaluate``): a model's predictions over a loader, and a run's metrics on a split.

Metrics are dicts keyed by ``fpt.config.METRIC_NAMES`` (plus ``loss``, ``confusion_matrix`` and
``num_samples``), as written to ``results.json``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fpt.cache import FeatureCache
from fpt.config import Precision
from fpt.data.datasets import Sample
from fpt.distributed import ONE_PROCESS, Ranks
from fpt.errors import FPTError
from fpt.metrics import classification_metrics
from fpt.models.base import WEIGHTS_NAME, TransferModel
from fpt.models.build import load_model
from fpt.run import CHECKPOINTS, RESULTS_FILE, Run, predictions_file, write_json
from fpt.runtime import autocast, select_device


@dataclass
class RunResults:
    """Test metrics of a run's best and last checkpoints (``results.json``)."""

    classes: list[str]
    best_epoch: int | None
    best: dict[str, Any]
    last: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"classes": self.classes, "best_epoch": self.best_epoch, "best": self.best, "last": self.last}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResults:
        return cls(data["classes"], data["best_epoch"], data["best"], data["last"])

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResults:
        return cls.from_dict(json.loads((Path(run_dir) / RESULTS_FILE).read_text()))


@torch.no_grad()
def predict_loader(
    model: TransferModel, loader: DataLoader, device: torch.device, precision: Precision, ranks: Ranks = ONE_PROCESS
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels [N], softmax probabilities [N, K] and mean cross-entropy of every batch of ``loader``; under
    torchrun, of every rank's loader (each its contiguous share of a split, ``Run.loader``), in split order on
    every rank."""
    model.eval()

    def predict_share() -> tuple[np.ndarray, np.ndarray, float]:
        labels, probabilities, loss = (
            [torch.zeros(0, dtype=torch.long)],
            [torch.zeros(0, model.config.num_classes)],
            0.0,
        )
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, precision):
                logits = model.logits(batch).float()
            loss += nn.functional.cross_entropy(logits, batch.label, reduction="sum").item()
            labels.append(batch.label.cpu())
            probabilities.append(logits.softmax(dim=-1).cpu())
        return torch.cat(labels).numpy(), torch.cat(probabilities).numpy(), loss

    shares = ranks.each(predict_share)  # an error on one rank stops every rank with its message
    labels_array = np.concatenate([share[0] for share in shares])
    probabilities_array = np.concatenate([share[1] for share in shares])
    return labels_array, probabilities_array, sum(share[2] for share in shares) / len(labels_array)


def evaluate_run(
    run_dir: str | Path, split: str = "test", checkpoint: str = "best", device: str | None = None
) -> dict[str, Any]:
    """Metrics of a run's ``checkpoint`` (best or last) on ``split``, using its feature cache when it has one."""
    run = Run.load(run_dir)
    if split not in run.dataset.splits:
        raise FPTError(f"unknown split '{split}'; the run has {', '.join(run.dataset.splits)}")
    directory = run.require_checkpoint(checkpoint)
    target = select_device(device or run.training.device)
    cache = run.open_cache([split])
    model = load_model(directory, load_lpm=cache is None).to(target)
    labels, probabilities, loss = predict_loader(model, run.loader(split, cache), target, run.training.precision)
    return {**classification_metrics(labels, probabilities), "loss": loss}


def evaluate_checkpoints(
    run: Run,
    model: TransferModel,
    device: torch.device,
    cache: FeatureCache | None,
    best_epoch: int | None,
    ranks: Ranks = ONE_PROCESS,
) -> RunResults:
    """Evaluate the best and last checkpoints on test, loading their trainable weights into ``model`` (whose
    LPM, when it has one, is reused); write their predictions and results.json (rank 0, under torchrun)."""
    metrics = {}
    loader = run.loader("test", cache, ranks=ranks)
    samples = run.dataset.splits["test"]
    for name in CHECKPOINTS:
        model.load_trainable_weights(run.require_checkpoint(name) / WEIGHTS_NAME)
        labels, probabilities, loss = predict_loader(model, loader, device, run.training.precision, ranks)
        metrics[name] = {**classification_metrics(labels, probabilities), "loss": loss}
        ranks.on_main(partial(_write_predictions, predictions_file(run.directory, name), run, samples, probabilities))
    results = RunResults(run.dataset.classes, best_epoch, metrics["best"], metrics["last"])
    ranks.on_main(lambda: write_json(run.directory / RESULTS_FILE, results.to_dict()))
    return results


def _write_predictions(path: Path, run: Run, samples: Sequence[Sample], probabilities: np.ndarray) -> None:
    path.parent.mkdir(exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", *(f"p_{c}" for c in run.dataset.classes)])
        for sample, row in zip(samples, probabilities, strict=True):
            writer.writerow([sample.path, sample.label, *(f"{p:.6f}" for p in row)])
