"""Training: a plain loop over the trainable modules, with evaluation, checkpoints and resume.

A run directory holds:

    run.json              resolved model and training configs, data source, normalisation, cache fingerprint
    splits.json           the class list and the exact images of every split
    metrics.jsonl         one line per epoch
    tensorboard/          TensorBoard events
    checkpoints/best/     config.json + model.safetensors of the best validation score
    checkpoints/last/     the same, plus optimizer.safetensors and state.json to resume from
    predictions/          per-image test probabilities of the best and last checkpoints
    results.json          test metrics of the best and last checkpoints
    report.html, *.png    curves, confusion matrices, ROC curves
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from fpt.cache import FeatureCache, PreloadSummary, preload
from fpt.config import MethodConfig, config_from_dict
from fpt.data.datasets import ImageDataset, load_dataset
from fpt.data.loaders import SampleViews, worker_count
from fpt.data.transforms import Augmentation, Normalization, dataset_normalization, lpm_view, side_view
from fpt.errors import FPTError
from fpt.metrics import METRIC_NAMES, classification_metrics
from fpt.models.backbone import backbone_mean_std, load_backbone
from fpt.models.base import WEIGHTS_NAME, TransferModel
from fpt.models.build import build_model, load_model
from fpt.models.fpt import FPTModel
from fpt.report import write_report
from fpt.runtime import PRECISIONS, Precision, autocast, progress_bar, seed_everything, select_device

RUN_FILE = "run.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINTS = ("best", "last")


@dataclass
class TrainingConfig:
    """How to train; defaults follow the original work.

    Attributes:
        epochs, batch_size, lr: schedule length, batch size and peak learning rate.
        weight_decay, betas: AdamW settings.
        warmup_epochs: linear warm-up before the per-iteration cosine decay (may be fractional).
        clip_grad_norm: gradient clipping threshold (None disables it).
        label_smoothing, balanced_class_weights: cross-entropy options.
        selection_metric: validation metric that picks the best checkpoint (higher is better).
        seed: seeds data splits, shuffling, augmentation, initialisation and dropout.
        device: "auto" (cuda > mps > cpu) or a torch device name.
        precision: "fp32", or "bf16"/"fp16" autocast on GPUs.
        num_workers: DataLoader workers (None: one per spare core, at most 4).
        cache_dir: feature cache directory (preloaded LPM keys/values); None runs the LPM on the fly.
        cache_dtype: dtype of cached keys/values.
        normalization: "backbone" (the LPM's pre-training mean/std) or "auto" (training-set statistics).
        augmentation: training-time augmentation of the side view (FPT) or of the high-resolution view
            (the baselines, which train through the LPM).
        val_fraction, test_fraction: shares moved out of train when a split is missing.
    """

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    clip_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    balanced_class_weights: bool = False
    selection_metric: str = "auc"
    seed: int = 0
    device: str = "auto"
    precision: Precision = "fp32"
    num_workers: int | None = None
    cache_dir: str | None = "fpt-cache"
    cache_dtype: str = "float16"
    normalization: str = "backbone"
    augmentation: Augmentation = field(default_factory=Augmentation)
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        if isinstance(self.augmentation, dict):
            self.augmentation = Augmentation(**self.augmentation)
        self.betas = tuple(self.betas)
        if self.selection_metric not in METRIC_NAMES:
            raise FPTError(f"selection metric must be one of {', '.join(METRIC_NAMES)}")
        if self.precision not in PRECISIONS:
            raise FPTError(f"precision must be one of {', '.join(PRECISIONS)}")
        if self.normalization not in ("backbone", "auto"):
            raise FPTError("normalization must be 'backbone' or 'auto'")
        if self.epochs < 1 or self.batch_size < 1:
            raise FPTError("epochs and batch size must be positive")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise FPTError("learning rate must be positive, weight decay and warm-up not negative")
        if not 0 <= self.label_smoothing < 1:
            raise FPTError("label smoothing must be in [0, 1)")
        if self.num_workers is not None and self.num_workers < 0:
            raise FPTError("--workers must not be negative")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise FPTError("gradient clipping norm must be positive (0 on the command line disables it)")
        augmentation = self.augmentation
        low, high = augmentation.crop_scale
        if not 0 < low <= high <= 1 or not 0 < augmentation.crop_ratio[0] <= augmentation.crop_ratio[1]:
            raise FPTError("crop scale must satisfy 0 < A <= B <= 1 and crop ratio 0 < A <= B")
        if not 0 <= augmentation.hflip <= 1 or augmentation.brightness < 0 or augmentation.contrast < 0:
            raise FPTError("flip probability must be in [0, 1] and jitter strengths not negative")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class Run:
    """Everything a run directory records about how it was set up."""

    directory: Path
    model_config: MethodConfig
    training: TrainingConfig
    data_source: str
    normalization: Normalization
    dataset: ImageDataset
    cache_fingerprint: dict[str, Any] | None

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "model": self.model_config.to_dict(),
            "training": asdict(self.training),
            "data_source": self.data_source,
            "normalization": asdict(self.normalization),
            "cache_fingerprint": self.cache_fingerprint,
        }
        _write_json(self.directory / RUN_FILE, record)
        _write_json(self.directory / SPLITS_FILE, self.dataset.to_record())

    @classmethod
    def load(cls, directory: str | Path) -> Run:
        directory = Path(directory)
        if not (directory / RUN_FILE).is_file():
            raise FPTError(f"{directory} is not a training run (no {RUN_FILE})")
        record = json.loads((directory / RUN_FILE).read_text())
        return cls(
            directory=directory,
            model_config=config_from_dict(record["model"]),
            training=TrainingConfig.from_dict(record["training"]),
            data_source=record["data_source"],
            normalization=Normalization(**record["normalization"]),
            dataset=ImageDataset.from_record(json.loads((directory / SPLITS_FILE).read_text())),
            cache_fingerprint=record["cache_fingerprint"],
        )

    def open_cache(self) -> FeatureCache | None:
        if self.cache_fingerprint is None:
            return None
        return FeatureCache.open(self.training.cache_dir, self.cache_fingerprint)

    def loader(self, split: str, cache: FeatureCache | None, generator: torch.Generator | None = None) -> DataLoader:
        """Batches of ``split``; with a ``generator`` shuffled by it and augmented (for training), else plain.

        The side view is augmented for training; the LPM view only for the methods that train through the
        LPM (the baselines), never for those whose LPM features are cacheable.
        """
        config, training = self.model_config, self.training
        augmentation = training.augmentation if generator is not None else None
        lpm_augmentation = None if config.cacheable else augmentation
        views = SampleViews(
            self.dataset.root,
            self.dataset.splits[split],
            side_view=side_view(config.side_input_size, self.normalization, augmentation)
            if config.side_network
            else None,
            lpm_view=lpm_view(config.lpm_input_size, self.normalization, lpm_augmentation)
            if cache is None and config.uses_lpm
            else None,
            cache=cache,
        )
        return DataLoader(
            views,
            batch_size=training.batch_size,
            shuffle=generator is not None,
            generator=generator,
            num_workers=worker_count(training.num_workers),
            pin_memory=torch.cuda.is_available(),
        )


def train(
    data: str | Path, run_dir: str | Path, model_config: MethodConfig, training: TrainingConfig, progress: bool = True
) -> dict[str, Any]:
    """Train ``model_config`` on the dataset at ``data``, writing everything to ``run_dir``; returns the results.

    The number of classes and their names come from the data. With ``training.cache_dir`` the LPM's
    features are preloaded (only the missing ones are computed) and training never runs the LPM; methods
    that train through the LPM (the baselines) ignore the cache.
    """
    run_dir = Path(run_dir)
    if (run_dir / RUN_FILE).exists():
        raise FPTError(
            f"{run_dir} already holds a run; continue it with `fpt train --resume {run_dir}` or pick a new --run"
        )
    if training.cache_dir is not None:  # recorded absolute, so the run can be evaluated from anywhere
        training = replace(training, cache_dir=str(Path(training.cache_dir).resolve()))
    dataset, model, normalization = prepare(data, model_config, training, progress)
    fingerprint = None
    if training.cache_dir is not None and model.config.cacheable:
        summary = cache_features(model, dataset, normalization, training, progress=progress)
        fingerprint = FeatureCache.open(summary.cache_dir).fingerprint
        model.encoder = None  # from here on training never runs (or holds) the LPM
    run = Run(run_dir, model.config, training, str(Path(data).resolve()), normalization, dataset, fingerprint)
    run.save()
    return _fit(run, model, resume=False, progress=progress)


def cache_features(
    model: FPTModel,
    dataset: ImageDataset,
    normalization: Normalization,
    training: TrainingConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> PreloadSummary:
    """Preload ``dataset`` into ``training.cache_dir`` with the training's dtype, batch size and device."""
    return preload(
        model,
        dataset,
        training.cache_dir,
        normalization,
        dtype=training.cache_dtype,
        batch_size=training.batch_size,
        num_workers=training.num_workers,
        device=training.device,
        precision=training.precision,
        overwrite=overwrite,
        progress=progress,
    )


def prepare(
    data: str | Path, model_config: MethodConfig, training: TrainingConfig, progress: bool = True
) -> tuple[ImageDataset, TransferModel, Normalization]:
    """Load the dataset, build the model for its classes (LPM included) and choose the normalisation."""
    seed_everything(training.seed)
    dataset = load_dataset(data, training.val_fraction, training.test_fraction, training.seed)
    if dataset.ignored_summary() and progress:
        print(dataset.ignored_summary())
    config = replace(model_config, num_classes=len(dataset.classes), class_names=dataset.classes)
    model = build_model(config)
    if training.normalization == "auto":
        train_paths = [str(dataset.root / s.path) for s in dataset.splits["train"]]
        normalization = dataset_normalization(train_paths, num_workers=worker_count(training.num_workers))
    else:
        with torch.device("meta"):  # only the pre-training statistics are read
            normalization = Normalization(*backbone_mean_std(load_backbone(config.backbone, pretrained=False)))
    return dataset, model, normalization


def resume(
    run_dir: str | Path, device: str | None = None, num_workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint (weights, optimizer, schedule, RNG, best score).

    ``device`` and ``num_workers`` may differ from the original run's (they do not change the result on the
    same kind of device); everything else is as recorded. A run stopped before its first checkpoint starts
    again from its recorded setup, exactly as it began.
    """
    run = Run.load(run_dir)
    overrides = {"device": device, "num_workers": num_workers}
    run.training = replace(run.training, **{k: v for k, v in overrides.items() if v is not None})
    if checkpoint_dir(run.directory, "last") is None:
        seed_everything(run.training.seed)  # the same initialisation as the interrupted start
        model = build_model(run.model_config)
        if run.cache_fingerprint is not None:
            model.encoder = None
        return _fit(run, model, resume=False, progress=progress)
    model = build_model(run.model_config, load_lpm=run.cache_fingerprint is None)
    return _fit(run, model, resume=True, progress=progress)


def _fit(run: Run, model: TransferModel, resume: bool, progress: bool) -> dict[str, Any]:
    training = run.training
    seed_everything(training.seed)
    device = select_device(training.device)
    model.to(device)
    cache = run.open_cache()
    generator = torch.Generator()
    train_loader = run.loader("train", cache, generator)
    val_loader = run.loader("val", cache)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=training.lr, betas=training.betas, weight_decay=training.weight_decay)
    total_steps = training.epochs * len(train_loader)
    warmup_steps = round(training.warmup_epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=training.precision == "fp16" and device.type == "cuda")
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(run.dataset).to(device) if training.balanced_class_weights else None,
        label_smoothing=training.label_smoothing,
    )
    start_epoch, best = 0, None
    if resume:
        state = _load_training_state(run.directory, model, optimizer, scheduler, scaler)
        start_epoch, best = state["epoch"] + 1, state["best"]
    _truncate_metrics(run.directory / METRICS_FILE, start_epoch)

    with SummaryWriter(str(run.directory / "tensorboard"), purge_step=start_epoch + 1) as board:
        for epoch in range(start_epoch, training.epochs):
            started = time.perf_counter()
            generator.manual_seed(training.seed + epoch)
            model.train()
            train_loss = _train_epoch(
                model, train_loader, optimizer, scheduler, scaler, criterion, device, training, epoch, progress
            )
            labels, probabilities, val_loss = predict_loader(model, val_loader, device, training.precision)
            val_metrics = classification_metrics(labels, probabilities)
            score = val_metrics[training.selection_metric]
            improved = best is None or (score is not None and score > best["score"])
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": scheduler.get_last_lr()[0],
                **{f"val_{name}": val_metrics[name] for name in METRIC_NAMES},
                "seconds": time.perf_counter() - started,
            }
            with (run.directory / METRICS_FILE).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            for name, value in record.items():
                if name != "epoch" and value is not None:
                    board.add_scalar(name.replace("_", "/", 1), value, epoch + 1)
            if improved:
                best = {"epoch": epoch + 1, "score": score}
                _save_atomically(run.directory / "checkpoints" / "best", model.save_pretrained)
            _save_atomically(
                run.directory / "checkpoints" / "last",
                partial(
                    _save_training_state,
                    model=model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    progress={"epoch": epoch, "best": best},
                ),
            )
            if progress:
                shown = f"{score:.4f}" if score is not None else "n/a"
                print(
                    f"epoch {epoch + 1}/{training.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"val {training.selection_metric} {shown}{' (best)' if improved else ''}"
                )
    results = _test_checkpoints(run, model, device, cache, best)
    write_report(run.directory)
    return results


def cosine_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per iteration: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _train_epoch(
    model: TransferModel,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    device: torch.device,
    training: TrainingConfig,
    epoch: int,
    progress: bool,
) -> float:
    total, count = 0.0, 0
    bar = progress_bar(loader, enabled=progress, desc=f"epoch {epoch + 1}/{training.epochs}", unit="batch", leave=False)
    for batch in bar:
        labels = batch["label"].to(device)
        with autocast(device, training.precision):
            loss = criterion(model_logits(model, batch, device), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if training.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FPTError(
                f"training diverged (loss {loss.item()}) in epoch {epoch + 1}; lower --lr, or use bf16 instead of fp16"
            )
        total += loss.item() * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / count


def model_logits(model: TransferModel, batch: dict[str, Tensor], device: torch.device) -> Tensor:
    """Logits of a batch from ``SampleViews``: a baseline reads the LPM view; FPT reads the side view and cached
    keys/values or the LPM view (run through its LPM); side-only reads the side view alone."""
    if not isinstance(model, FPTModel):
        return model(batch["lpm"].to(device, non_blocking=True))
    side = batch["side"].to(device, non_blocking=True)
    if "keys" in batch:
        return model(side, batch["keys"].to(device, non_blocking=True), batch["values"].to(device, non_blocking=True))
    if "lpm" in batch:
        return model.forward_images(batch["lpm"].to(device, non_blocking=True), side)
    return model(side)


@torch.no_grad()
def predict_loader(
    model: TransferModel, loader: DataLoader, device: torch.device, precision: Precision
) -> tuple[np.ndarray, np.ndarray, float]:
    """Labels [N], softmax probabilities [N, K] and mean cross-entropy of every batch of ``loader``."""
    model.eval()
    labels, probabilities, loss = [], [], 0.0
    for batch in loader:
        with autocast(device, precision):
            logits = model_logits(model, batch, device).float()
        target = batch["label"].to(device)
        loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        labels.append(target.cpu())
        probabilities.append(logits.softmax(dim=-1).cpu())
    labels_array = torch.cat(labels).numpy()
    return labels_array, torch.cat(probabilities).numpy(), loss / len(labels_array)


def evaluate_run(
    run_dir: str | Path, split: str = "test", checkpoint: str = "best", device: str | None = None
) -> dict[str, Any]:
    """Metrics of a run's ``checkpoint`` (best or last) on ``split``, using its feature cache when it has one."""
    run = Run.load(run_dir)
    if split not in run.dataset.splits:
        raise FPTError(f"unknown split '{split}'; the run has {', '.join(run.dataset.splits)}")
    directory = checkpoint_dir(run.directory, checkpoint)
    if directory is None:
        raise FPTError(f"{run.directory} has no '{checkpoint}' checkpoint yet")
    target = select_device(device or run.training.device)
    cache = run.open_cache()
    model = load_model(directory, load_lpm=cache is None).to(target)
    labels, probabilities, loss = predict_loader(model, run.loader(split, cache), target, run.training.precision)
    return {**classification_metrics(labels, probabilities), "loss": loss}


def _test_checkpoints(
    run: Run, model: TransferModel, device: torch.device, cache: FeatureCache | None, best: dict[str, Any] | None
) -> dict[str, Any]:
    """Evaluate the best and last checkpoints on test, loading their trainable weights into ``model`` (whose
    LPM, when it has one, is reused); write predictions and results.json."""
    results: dict[str, Any] = {"classes": run.dataset.classes, "best_epoch": best["epoch"] if best else None}
    loader = run.loader("test", cache)
    samples = run.dataset.splits["test"]
    (run.directory / "predictions").mkdir(exist_ok=True)
    for name in CHECKPOINTS:
        model.load_trainable_weights(checkpoint_dir(run.directory, name) / WEIGHTS_NAME)
        labels, probabilities, loss = predict_loader(model, loader, device, run.training.precision)
        results[name] = {**classification_metrics(labels, probabilities), "loss": loss}
        with (run.directory / "predictions" / f"test_{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", *(f"p_{c}" for c in run.dataset.classes)])
            for sample, row in zip(samples, probabilities, strict=True):
                writer.writerow([sample.path, sample.label, *(f"{p:.6f}" for p in row)])
    _write_json(run.directory / RESULTS_FILE, results)
    return results


def _class_weights(dataset: ImageDataset) -> Tensor:
    """Balanced weights N / (K * n_c) from the training split."""
    counts = torch.tensor(dataset.class_counts("train"), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)


def checkpoint_dir(run_dir: Path, name: str) -> Path | None:
    """The checkpoint directory, or its previous version if a save was interrupted mid-swap."""
    for candidate in (run_dir / "checkpoints" / name, run_dir / "checkpoints" / f"{name}.old"):
        if (candidate / "model.safetensors").is_file():
            return candidate
    return None


def _save_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary directory, then swap it in, so an interruption never leaves a partial checkpoint."""
    temporary = directory.with_name(directory.name + ".tmp")
    previous = directory.with_name(directory.name + ".old")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    write(temporary)
    if directory.exists():
        shutil.rmtree(previous, ignore_errors=True)
        directory.rename(previous)
    temporary.rename(directory)
    shutil.rmtree(previous, ignore_errors=True)


def _save_training_state(
    directory: Path,
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: dict[str, Any],
) -> None:
    model.save_pretrained(directory)
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"optimizer.{index}.{name}": value.contiguous()
        for index, state in optimizer_state["state"].items()
        for name, value in state.items()
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / "optimizer.safetensors")
    state = {
        **progress,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    _write_json(directory / "state.json", state)


def _load_training_state(
    run_dir: Path,
    model: TransferModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> dict[str, Any]:
    directory = checkpoint_dir(run_dir, "last")
    model.load_trainable_weights(directory / WEIGHTS_NAME)
    state = json.loads((directory / "state.json").read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    optimizer_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop metric lines of epochs whose checkpoint was never written (an interruption in between)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epochs_done:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the interruption
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
