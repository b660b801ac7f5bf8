"""Training (``fpt train``): a plain loop over the trainable modules, with per-epoch validation, checkpoints and
resume. The run directory's layout is ``fpt.run``'s; evaluation is ``fpt.evaluate``'s.

Under torchrun (``torchrun --nproc_per_node N -m fpt train ...``) every rank runs this loop on its share of each
global batch of ``batch_size`` samples (``GlobalBatchSampler``); after each backward pass the trainable
parameters' gradients are summed over the ranks (one all-reduce of the trainable parameters only: the frozen
LPM, cached or not, never takes part), each rank's loss having been divided by the global batch's size (or
weight), so every rank applies the gradient of the same global batch one process would. Validation and test
predictions are gathered from every rank's share; rank 0 alone writes the run directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from fpt import distributed
from fpt.cache import FeatureCache
from fpt.config import METRIC_NAMES, MethodConfig, TrainingConfig
from fpt.data.datasets import ImageDataset
from fpt.data.loaders import Batch, collate, start_epoch
from fpt.distributed import ONE_PROCESS, Ranks
from fpt.errors import FPTError
from fpt.evaluate import RunResults, evaluate_checkpoints, predict_loader
from fpt.metrics import classification_metrics
from fpt.models.base import TransferModel
from fpt.models.build import build_model
from fpt.preload import preload
from fpt.report import write_report
from fpt.run import (
    CHECKPOINTS_DIR,
    METRICS_FILE,
    RUN_FILE,
    TENSORBOARD_DIR,
    Run,
    TrainingState,
    save_atomically,
    training_into,
    truncate_metrics,
)
from fpt.runtime import autocast, derived_seed, progress_bar, seed_everything, select_device
from fpt.task import prepare


def train(
    data: str | Path, run_dir: str | Path, model_config: MethodConfig, training: TrainingConfig, progress: bool = True
) -> RunResults:
    """Train ``model_config`` on the dataset at ``data``, writing everything to ``run_dir``; returns the results.

    The number of classes and their names come from the data. With ``training.cache_dir`` the LPM's
    features are preloaded (only the missing ones are computed) and training never runs the LPM; methods
    that train through the LPM (the baselines) ignore the cache. Seeds the global random generators with
    ``training.seed``. Under torchrun every rank calls this (with the same arguments) and gets the results.
    """
    ranks = distributed.ranks(training.device)
    run_dir = Path(run_dir)
    with training_into(run_dir, ranks):
        ranks.on_main(lambda: _refuse_existing_run(run_dir))
        return _train_new(data, run_dir, model_config, training, progress, ranks)


def _refuse_existing_run(run_dir: Path) -> None:
    if (run_dir / RUN_FILE).exists():
        raise FPTError(
            f"{run_dir} already holds a run; continue it with `fpt train --resume {run_dir}` or pick a new --run"
        )


def _train_new(
    data: str | Path,
    run_dir: Path,
    model_config: MethodConfig,
    training: TrainingConfig,
    progress: bool,
    ranks: Ranks,
) -> RunResults:
    training = training.for_method(type(model_config))
    if training.cache_dir is not None:  # recorded absolute, so the run can be evaluated from anywhere
        training = replace(training, cache_dir=str(Path(training.cache_dir).resolve()))
    dataset, model, normalization = prepare(data, model_config, training, progress and ranks.is_main)
    fingerprint = None
    if training.cache_dir is not None and model.config.cacheable:
        summary = preload(model, dataset, normalization, training, progress=progress)
        fingerprint = FeatureCache.open(summary.cache_dir).fingerprint
        model.drop_lpm()  # from here on training never runs (or holds) the LPM
    run = Run(run_dir, model.config, training, str(Path(data).resolve()), normalization, dataset, fingerprint)
    ranks.on_main(run.save)
    return _fit(run, model, resume=False, progress=progress, verify_cache=False, ranks=ranks)  # just verified


def resume(
    run_dir: str | Path, device: str | None = None, num_workers: int | None = None, progress: bool = True
) -> RunResults:
    """Continue an interrupted run from its last checkpoint (weights, optimizer, schedule, RNG, best score).

    ``device`` and ``num_workers`` may differ from the original run's (they do not change the result on the
    same kind of device), and so may the number of processes under torchrun; everything else is as recorded. A
    run stopped before its first checkpoint starts again from its recorded setup, exactly as it began. Seeds the
    global random generators as training does.
    """
    run = Run.load(run_dir)
    overrides = {"device": device, "num_workers": num_workers}
    run.training = replace(run.training, **{k: v for k, v in overrides.items() if v is not None})
    ranks = distributed.ranks(run.training.device)
    with training_into(run.directory, ranks):
        if run.checkpoint("last") is None:
            seed_everything(run.training.seed)  # the same initialisation as the interrupted start
            model = build_model(run.model_config)
            if run.cache_fingerprint is not None:
                model.drop_lpm()
            return _fit(run, model, resume=False, progress=progress, verify_cache=True, ranks=ranks)
        model = build_model(run.model_config, load_lpm=run.cache_fingerprint is None)
        return _fit(run, model, resume=True, progress=progress, verify_cache=True, ranks=ranks)


@dataclass
class Trainer:
    """What one optimizer step needs: the model, its optimizer state, the loss, where it all runs, and the ranks
    of the job.

    ``class_weights`` [K] weigh each sample's cross-entropy by its class (None: all 1); a step's loss is the
    weighted mean over its global batch, as ``nn.CrossEntropyLoss`` computes it over one batch.
    """

    model: TransferModel
    state: TrainingState
    class_weights: Tensor | None
    device: torch.device
    training: TrainingConfig
    ranks: Ranks = ONE_PROCESS

    def train_epoch(self, loader: DataLoader, epoch: int, epochs: int, progress: bool) -> EpochStats:
        """One pass over ``loader`` (epoch ``epoch`` of ``epochs``, 0-based); returns the mean training loss and the
        mean gradient norms."""
        training, optimizer, scaler = self.training, self.state.optimizer, self.state.scaler
        self.model.train()
        total, count = 0.0, 0
        norms: dict[str, Tensor] = {}
        bar = progress_bar(loader, enabled=progress, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False)
        started = time.perf_counter()
        for batch in bar:
            failure = None
            try:
                batch = batch.to(self.device)
            except FPTError as error:  # a sample this rank could not read
                failure = str(error)
            if failure is None and len(batch):
                loss_sum, weight, samples = self._local_loss(batch)
            else:  # no share of this step (a last batch smaller than the job), or no batch: no forward pass
                self.model.join_empty_step()
                loss_sum = weight = samples = torch.zeros((), device=self.device)
            # one host sync per step: the global batch's loss, weight and size, and whether a rank failed
            loss_total, weight_total, global_samples, failures = self.ranks.sum(
                torch.stack([loss_sum.detach().float(), weight, samples, weight.new_tensor(failure is not None)])
            ).tolist()
            if failures:  # every rank stops, with the failed rank's message
                self.ranks.each(partial(_raise_if_failed, failure))
            loss_value = loss_total / weight_total
            if not math.isfinite(loss_value):  # before the update, so the weights never see it
                raise FPTError(
                    f"training diverged (loss {loss_value}) in epoch {epoch + 1}; lower --lr, or use bf16 instead "
                    "of fp16"
                )
            optimizer.zero_grad(set_to_none=True)
            if loss_sum.requires_grad:
                scaler.scale(loss_sum / weight_total).backward()
            self.ranks.sum_gradients(self.model.parameters())
            if training.clip_grad_norm is not None or scaler.is_enabled():
                scaler.unscale_(optimizer)
            for group, norm in gradient_norms(self.model).items():
                norms[group] = norms[group] + norm if group in norms else norm
            if training.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), training.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            self.state.scheduler.step()
            total += loss_value * global_samples
            count += int(global_samples)
            bar.set_postfix(loss=f"{total / count:.4f}")
        steps = len(loader)
        mean_norms = {group: norm.item() / steps for group, norm in norms.items()}
        return EpochStats(total / count, mean_norms, (time.perf_counter() - started) / steps)

    def _local_loss(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of a step: the sum of its samples' (weighted) cross-entropies, the sum of their
        weights and their number (0-d float tensors on the device)."""
        count = torch.tensor(float(len(batch)), device=self.device)
        with autocast(self.device, self.training.precision):
            logits = self.model.logits(batch)
        weights = self.class_weights
        losses = nn.functional.cross_entropy(
            logits.float(), batch.label, weight=weights, label_smoothing=self.training.label_smoothing, reduction="none"
        )
        return losses.sum(), weights[batch.label].sum() if weights is not None else count, count


def _raise_if_failed(failure: str | None) -> None:
    if failure is not None:
        raise FPTError(failure)


@dataclass
class EpochStats:
    """One training epoch: the mean loss, each parameter group's mean gradient norm (before clipping), and the
    wall time of an optimizer step (the training pass over the epoch's steps, without validation)."""

    loss: float
    gradient_norms: dict[str, float]
    seconds_per_step: float


def gradient_norms(model: nn.Module, depth: int = 2) -> dict[str, Tensor]:
    """L2 norm of the gradients of each group of trainable parameters, grouped by the first ``depth`` parts of
    their names (``fusion.prompts``, ``side.blocks``, ``backbone.head``, ...), as 0-d tensors (read once per
    epoch, so a step adds no host sync)."""
    squares: dict[str, list[Tensor]] = {}
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            squares.setdefault(".".join(name.split(".")[:depth]), []).append(
                parameter.grad.detach().float().square().sum()
            )
    return {group: torch.stack(values).sum().sqrt() for group, values in squares.items()}


def _fit(run: Run, model: TransferModel, resume: bool, progress: bool, verify_cache: bool, ranks: Ranks) -> RunResults:
    training = run.training
    seed_everything(training.seed)
    device = select_device(ranks.device_name(training.device))
    progress = progress and ranks.is_main
    model.set_grad_checkpointing(training.grad_checkpointing)
    model.to(device)
    cache = run.open_cache(verify=verify_cache, ranks=ranks)
    train_loader = run.loader("train", cache, shuffle=True, ranks=ranks)
    val_loader = run.loader("val", cache, ranks=ranks)
    optimizer = torch.optim.AdamW(parameter_groups(model, training), lr=training.lr, betas=training.betas)
    epochs = training.scheduled_epochs(len(train_loader))
    total_steps = epochs * len(train_loader)
    warmup_steps = round(training.warmup_epochs * len(train_loader))
    state = TrainingState(
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(total_steps, warmup_steps, training.decay_fraction)
        ),
        scaler=torch.amp.GradScaler(device.type, enabled=training.precision == "fp16" and device.type == "cuda"),
    )
    class_weights = _class_weights(run.dataset).to(device) if training.balanced_class_weights else None
    if training.prior_bias and not resume:
        start_at_class_prior(model.classifier(), run.dataset.class_counts("train"))
    trainer = Trainer(model, state, class_weights, device, training, ranks)
    start, best = 0, None
    if resume:
        saved = state.load(run.require_checkpoint("last"), model)
        start, best = saved["epoch"] + 1, saved["best"]
    ranks.on_main(lambda: truncate_metrics(run.directory / METRICS_FILE, start))

    with ExitStack() as held:  # the run directory is written by rank 0 only
        log = ranks.on_main(
            lambda: held.enter_context(EpochLog(run, model, state, device, val_loader.dataset, start, progress))
        )
        for epoch in range(start, epochs):
            started = time.perf_counter()
            start_epoch(train_loader, epoch)
            if ranks.distributed:  # each rank its own dropout masks (the same again after a resume)
                torch.manual_seed(derived_seed(training.seed, epoch, ranks.rank))
            stats = trainer.train_epoch(train_loader, epoch, epochs, progress)
            labels, probabilities, val_loss = predict_loader(model, val_loader, device, training.precision, ranks)
            val_metrics = classification_metrics(labels, probabilities)
            score = val_metrics[training.selection_metric]
            improved = best is None or (score is not None and score > best["score"])
            if improved:
                best = {"epoch": epoch + 1, "score": score}
            record = {
                "epoch": epoch + 1,
                "train_loss": stats.loss,
                "val_loss": val_loss,
                "lr": state.scheduler.get_last_lr()[0],
                "seconds_per_step": stats.seconds_per_step,
                **{f"val_{name}": val_metrics[name] for name in METRIC_NAMES},
                **{f"grad_norm/{group}": norm for group, norm in stats.gradient_norms.items()},
            }
            # the other ranks wait here until the epoch's checkpoints are written
            ranks.on_main(partial(EpochLog.write, log, record, started, best, improved, epochs))  # log: None but on 0
    results = evaluate_checkpoints(run, model, device, cache, best["epoch"] if best else None, ranks)
    ranks.on_main(lambda: write_report(run.directory))
    return results


class EpochLog:
    """What rank 0 writes after each epoch: the record in metrics.jsonl and TensorBoard (with the model's
    diagnostics on the first validation images and the epoch's seconds), the best and last checkpoints, and a
    line on the terminal."""

    def __init__(
        self,
        run: Run,
        model: TransferModel,
        state: TrainingState,
        device: torch.device,
        val_views: Dataset,
        start: int,
        progress: bool,
    ) -> None:
        self.run, self.model, self.state, self.device, self.progress = run, model, state, device, progress
        self.board = SummaryWriter(str(run.directory / TENSORBOARD_DIR), purge_step=start + 1)
        # built without a DataLoader iterator, which would draw from the global generator
        self.diagnostic_batch = collate([val_views[i] for i in range(min(run.training.batch_size, len(val_views)))])

    def __enter__(self) -> EpochLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.board.close()

    def write(self, record: dict[str, float | None], started: float, best: dict, improved: bool, epochs: int) -> None:
        training, directory = self.run.training, self.run.directory
        with autocast(self.device, training.precision):
            record.update(self.model.diagnostics(self.diagnostic_batch.to(self.device)))
        record["seconds"] = time.perf_counter() - started
        with (directory / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name != "epoch" and value is not None:  # train_loss -> train/loss; grouped names as they are
                self.board.add_scalar(name if "/" in name else name.replace("_", "/", 1), value, record["epoch"])
        if improved:
            save_atomically(directory / CHECKPOINTS_DIR / "best", self.model.save_pretrained)
        epoch = int(record["epoch"]) - 1
        save_atomically(
            directory / CHECKPOINTS_DIR / "last", partial(self.state.save, model=self.model, epoch=epoch, best=best)
        )
        if self.progress:
            score = record[f"val_{training.selection_metric}"]
            shown = f"{score:.4f}" if score is not None else "n/a"
            print(
                f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f}, val loss "
                f"{record['val_loss']:.4f}, val {training.selection_metric} {shown}{' (best)' if improved else ''}, "
                f"{record['seconds_per_step'] * 1000:.0f} ms/step, {record['seconds']:.1f} s"
            )


def parameter_groups(model: nn.Module, training: TrainingConfig) -> list[dict[str, object]]:
    """The trainable parameters as AdamW groups, in ``named_parameters`` order within each group.

    With the defaults this is one group at ``training.lr`` decaying every parameter, as the official code does;
    ``weight_decay_scope="weights"`` moves prompts, tokens, position embeddings, norms and biases to a group
    without decay, and ``fusion_lr_scale`` gives the fusion module's parameters their own learning rate.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = training.weight_decay_scope == "all" or (parameter.ndim >= 2 and not _is_embedding(name))
        lr = training.lr * (training.fusion_lr_scale if name.startswith("fusion.") else 1.0)
        groups.setdefault((lr, training.weight_decay if decays else 0.0), []).append(parameter)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def _is_embedding(name: str) -> bool:
    """Prompts, CLS/register tokens and position embeddings: vectors in the token space, not weight matrices."""
    return name.rsplit(".", 1)[-1] in ("prompts", "cls_token", "reg_token", "pos_embed")


def cosine_schedule(total_steps: int, warmup_steps: int, decay_fraction: float = 1.0) -> Callable[[int], float]:
    """Learning-rate factor per iteration: linear warm-up to 1, held at 1, then cosine decay to 0 over the last
    ``decay_fraction`` of the steps after the warm-up (1.0: the decay starts right after the warm-up)."""
    decay_steps = max(1, round(decay_fraction * (total_steps - warmup_steps)))
    decay_start = total_steps - decay_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = max(0, step - decay_start) / decay_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def start_at_class_prior(classifier: nn.Linear, class_counts: list[int]) -> None:
    """Set the classifier's bias to the log of the class frequencies ``class_counts`` (a class without a sample
    counts as one)."""
    counts = torch.tensor(class_counts, dtype=torch.float32).clamp(min=1.0)
    classifier.bias.copy_((counts / counts.sum()).log())


def _class_weights(dataset: ImageDataset) -> Tensor:
    """Balanced weights N / (K * n_c) from the training split."""
    counts = torch.tensor(dataset.class_counts("train"), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)
