"""The run directory: what ``fpt train`` writes and every later command reads.

A run directory holds:

    run.json              resolved model and training configs, data source, normalisation, cache fingerprint
    splits.json           the class list and the exact images of every split
    metrics.jsonl         one line per epoch (losses, validation metrics, gradient norms, prompt diagnostics)
    tensorboard/          TensorBoard events
    checkpoints/best/     config.json + model.safetensors of the best validation score
    checkpoints/last/     the same, plus optimizer.safetensors and state.json to resume from
    predictions/          per-image test probabilities of the best and last checkpoints (test_<name>.csv)
    results.json          test metrics of the best and last checkpoints
    report.html, *.png    curves, confusion matrices, ROC curves

Every file name is defined here; checkpoints are swapped in atomically and the training state is stored as
safetensors plus JSON (no pickle anywhere in a run directory).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader

from fpt.cache import FeatureCache, content_digests
from fpt.config import MethodConfig, TrainingConfig, config_from_dict
from fpt.data.datasets import ImageDataset
from fpt.data.loaders import GlobalBatchSampler, SampleViews, collate, decode_in_memory, worker_count
from fpt.data.transforms import Normalization, lpm_view, side_view
from fpt.distributed import ONE_PROCESS, Ranks
from fpt.errors import FPTError
from fpt.models.base import WEIGHTS_NAME, TransferModel

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two processes training into one run are then not refused
    fcntl = None

RUN_FILE = "run.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
PREDICTIONS_DIR = "predictions"
CHECKPOINTS = ("best", "last")
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOCK_FILE = "run.lock"


@contextmanager
def training_into(directory: Path, ranks: Ranks = ONE_PROCESS) -> Iterator[None]:
    """Hold the run directory's lock while training into it: a second process is refused, never interleaved.
    Under torchrun rank 0 holds it for the job, and a refusal stops every rank."""
    with ExitStack() as held:
        ranks.on_main(lambda: held.enter_context(_locked(directory)))
        yield


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    if directory.exists() and not directory.is_dir():
        raise FPTError(f"the run path {directory} is a file, not a directory; pass another --run")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK_FILE, "a")  # noqa: SIM115 (closed below)
    except OSError as error:
        raise FPTError(
            f"cannot write to the run directory {directory} ({error.strerror}); pass another --run"
        ) from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FPTError(
                    f"another fpt process is training into {directory}; wait for it to finish or pass another --run"
                ) from None
        yield
    finally:
        handle.close()


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
            "training": self.training.to_dict(),
            "data_source": self.data_source,
            "normalization": asdict(self.normalization),
            "cache_fingerprint": self.cache_fingerprint,
        }
        write_json(self.directory / RUN_FILE, record)
        write_json(self.directory / SPLITS_FILE, self.dataset.to_record())

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

    def checkpoint(self, name: str) -> Path | None:
        """The directory of checkpoint ``name`` (best or last), or its previous version if a save was interrupted
        mid-swap; None before the first one is written."""
        for candidate in (self.directory / CHECKPOINTS_DIR / name, self.directory / CHECKPOINTS_DIR / f"{name}.old"):
            if (candidate / WEIGHTS_NAME).is_file():
                return candidate
        return None

    def require_checkpoint(self, name: str) -> Path:
        directory = self.checkpoint(name)
        if directory is None:
            raise FPTError(f"{self.directory} has no '{name}' checkpoint yet")
        return directory

    def open_cache(
        self, splits: Sequence[str] | None = None, verify: bool = True, ranks: Ranks = ONE_PROCESS
    ) -> FeatureCache | None:
        """The run's feature cache (None without one). With ``verify``, refused unless it holds the features of
        the exact current bytes of every image of ``splits`` (all of them by default); under torchrun each rank
        hashes its share of the images and every rank checks them all."""
        if self.cache_fingerprint is None:
            return None
        cache = FeatureCache.open(self.training.cache_dir, self.cache_fingerprint)
        if verify:
            root = self.dataset.root
            keys = [sample.path for split in splits or self.dataset.splits for sample in self.dataset.splits[split]]
            shares = ranks.each(lambda: content_digests(root, keys[ranks.rank :: ranks.world_size]))
            cache.require_current(root, keys, {key: digest for share in shares for key, digest in share.items()})
        return cache

    def loader(
        self, split: str, cache: FeatureCache | None, shuffle: bool = False, ranks: Ranks = ONE_PROCESS
    ) -> DataLoader:
        """Batches of ``split`` for this rank: with ``shuffle`` (training) its share of every global batch of the
        seeded order of each epoch (``start_epoch``), augmented; else its contiguous share of the split, in
        order and plain.

        The side view is augmented for training; the LPM view only for the methods that train through the
        LPM (the baselines), never for those whose LPM features are cacheable. The split's images are decoded
        once into memory when they fit ``training.decoded_images_mib``.
        """
        config, training = self.model_config, self.training
        augmentation = training.augmentation if shuffle else None
        lpm_augmentation = None if config.cacheable else augmentation
        samples = self.dataset.splits[split]
        reads_images = config.side_network or (cache is None and config.uses_lpm)
        read = range(len(samples)) if shuffle else ranks.share(len(samples))  # what this rank reads
        budget = training.decoded_images_mib * 2**20
        views = SampleViews(
            self.dataset.root,
            samples,
            side_view=side_view(config.side_input_size, self.normalization, augmentation)
            if config.side_network
            else None,
            lpm_view=lpm_view(config.lpm_input_size, self.normalization, lpm_augmentation)
            if cache is None and config.uses_lpm
            else None,
            cache=cache,
            decoded=decode_in_memory(self.dataset.root, [samples[i] for i in read], budget)
            if reads_images and budget
            else None,
            augmentation_seed=training.seed if shuffle else None,
        )
        batches = (
            {"batch_sampler": GlobalBatchSampler(len(samples), training.batch_size, training.seed, ranks)}
            if shuffle
            else {"batch_size": training.batch_size, "sampler": read}
        )
        count = len(batches["batch_sampler"]) if shuffle else math.ceil(len(read) / training.batch_size)
        return DataLoader(
            views,
            **batches,
            num_workers=worker_count(training.num_workers, count),
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
        )


def predictions_file(run_dir: Path, checkpoint: str) -> Path:
    """Per-image test probabilities of a run's ``checkpoint`` (columns path, label, p_<class>...)."""
    return run_dir / PREDICTIONS_DIR / f"test_{checkpoint}.csv"


def save_atomically(directory: Path, write: Callable[[Path], None]) -> None:
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


@dataclass
class TrainingState:
    """What resuming needs besides the weights: the optimizer, schedule and scaler, and how far training got."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    def save(self, directory: Path, model: TransferModel, epoch: int, best: dict[str, Any] | None) -> None:
        """``model.save_pretrained`` plus the optimizer state and the global RNG states (safetensors) and the
        schedule, scaler, last finished ``epoch`` (0-based) and ``best`` {epoch, score} (state.json)."""
        model.save_pretrained(directory)
        optimizer_state = self.optimizer.state_dict()
        tensors = {
            f"optimizer.{index}.{name}": value.contiguous()
            for index, state in optimizer_state["state"].items()
            for name, value in state.items()
        }
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
        save_file(tensors, directory / OPTIMIZER_FILE)
        state = {
            "epoch": epoch,
            "best": best,
            "param_groups": optimizer_state["param_groups"],
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        write_json(directory / STATE_FILE, state)

    def load(self, directory: Path, model: TransferModel) -> dict[str, Any]:
        """Restore what ``save`` wrote into ``model`` and this state; returns state.json (epoch, best, ...)."""
        model.load_trainable_weights(directory / WEIGHTS_NAME)
        state = json.loads((directory / STATE_FILE).read_text())
        tensors = load_file(directory / OPTIMIZER_FILE)
        optimizer_state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optimizer_state, "param_groups": state["param_groups"]})
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors["rng.cpu"])
        cuda_states = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
        return state


def truncate_metrics(path: Path, epochs_done: int) -> None:
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


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl``."""
    lines = (directory / METRICS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a temporary file renamed over ``path``)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)
