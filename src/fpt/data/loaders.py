"""From samples to model inputs: the typed ``Batch`` every model reads, and the torch Dataset that builds it.

A ``Batch`` holds whichever inputs the method needs (the side view, the LPM view, or the LPM's cached
keys/values) with the labels and sample indices; ``TransferModel.logits(batch)`` is the one way any model
reads it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fpt.data.datasets import Sample
from fpt.data.images import decode_rgb8, load_pixels, pixel_count, pixels_to_float
from fpt.data.transforms import ImageTransform, Normalization
from fpt.distributed import Ranks
from fpt.errors import FPTError
from fpt.runtime import derived_seed, progress_bar

INPUT_FIELDS = ("side", "lpm", "keys", "values", "keys_scale", "values_scale", "embedding", "embedding_scale")


@dataclass
class Batch:
    """Inputs of B samples; a method uses the ones it needs.

    Attributes:
        label: [B] class indices.
        index: [B] positions of the samples in their split.
        side: [B, 3, s, s] down-sampled (side) view.
        lpm: [B, 3, S, S] high-resolution view (the LPM runs on it).
        keys, values: [B, L, H, T, d_head] the LPM's preloaded important-token keys/values (FPT, FPT+).
        embedding: [B, D] the LPM's preloaded pooled embedding (the linear probe).
        keys_scale, values_scale, embedding_scale: from an int8 cache, the scale of each vector of the last
            dimension ([B, L, H, T], [B, L, H, T], [B]); None for a floating cache.
        error: a sample could not be read (set by ``collate`` in a DataLoader worker, raised by ``to``), so the
            user sees fpt's own one-line message rather than the worker's traceback.
    """

    label: Tensor
    index: Tensor
    side: Tensor | None = None
    lpm: Tensor | None = None
    keys: Tensor | None = None
    values: Tensor | None = None
    embedding: Tensor | None = None
    keys_scale: Tensor | None = None
    values_scale: Tensor | None = None
    embedding_scale: Tensor | None = None
    error: str | None = None

    def __len__(self) -> int:
        return len(self.label)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        """The batch on ``device``; raises the ``FPTError`` of a sample that could not be read."""
        if self.error is not None:
            raise FPTError(self.error)
        moved = {name: tensor.to(device, non_blocking=non_blocking) for name, tensor in self._tensors().items()}
        return replace(self, **moved)

    def pin_memory(self) -> Batch:
        """Called by a DataLoader with ``pin_memory=True``."""
        if self.error is not None:
            return self
        return replace(self, **{name: tensor.pin_memory() for name, tensor in self._tensors().items()})

    def inputs(self) -> list[Tensor]:
        """The present model inputs, in ``INPUT_FIELDS`` order (for the memory meters)."""
        return [getattr(self, name) for name in INPUT_FIELDS if getattr(self, name) is not None]

    def with_inputs(self, tensors: Sequence[Tensor]) -> Batch:
        """The batch with its present inputs replaced by ``tensors`` (as ordered by ``inputs``)."""
        present = [name for name in INPUT_FIELDS if getattr(self, name) is not None]
        return replace(self, **dict(zip(present, tensors, strict=True)))

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}


def collate(items: list[dict]) -> Batch:
    """A ``Batch`` from ``SampleViews`` items (the DataLoader's ``collate_fn``); no items make an empty batch (a
    rank's share of a last batch smaller than the job)."""
    failed = next((item["error"] for item in items if "error" in item), None)
    if failed is not None or not items:
        return Batch(label=torch.empty(0, dtype=torch.long), index=torch.empty(0, dtype=torch.long), error=failed)
    return Batch(**default_collate(items))


class GlobalBatchSampler(Sampler[list[int]]):
    """Training batches of one rank: each epoch the split in a seeded random order, cut into global batches of
    ``batch_size``, of which this rank takes its contiguous share (``Ranks.share``).

    The ranks of a job together see exactly the batches one process sees, whatever their number: no sample is
    duplicated to even out the ranks (as ``DistributedSampler`` does) and the last, smaller batch is kept.

    Args:
        count: samples in the split.
        batch_size: samples per global batch (per optimizer step, over all ranks).
        seed: with the epoch, seeds the order (``set_epoch``).
        ranks: this process's ranks.
    """

    def __init__(self, count: int, batch_size: int, seed: int, ranks: Ranks) -> None:
        if ranks.world_size > min(count, batch_size):  # the first batch of an epoch must reach every rank
            raise FPTError(
                f"{ranks.world_size} processes share each batch, but the batch size is {batch_size} and the training "
                f"split has {count} images; pass --batch-size {ranks.world_size} or more, or start fewer processes"
            )
        self.count, self.batch_size, self.seed, self.ranks = count, batch_size, seed, ranks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for start in range(0, self.count, self.batch_size):
            batch = order[start : start + self.batch_size]
            share = self.ranks.share(len(batch))
            yield batch[share.start : share.stop]


def start_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch of a training loader (``Run.loader(..., shuffle=True)``): its order and augmentation."""
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.epoch = epoch


class FeatureSource(Protocol):
    """Where preloaded LPM features come from (``fpt.cache.FeatureCache``)."""

    def get(self, key: str) -> dict[str, Tensor]:
        """The preloaded parts of one image, named as ``Batch`` fields (``keys`` and ``values``, or
        ``embedding``)."""
        ...


class SampleViews(Dataset):
    """Item i (collated into a ``Batch`` by ``collate``): ``index`` and ``label``, plus

    - ``side`` [3, s, s] when ``side_view`` is given;
    - ``lpm`` [3, S, S] when ``lpm_view`` is given (the LPM runs on the fly);
    - the preloaded features when ``cache`` is given (``keys``/``values`` [L, H, T, d_head], or ``embedding``
      [D]).

    The image is decoded only when a view needs it. A sample that cannot be read yields its error message
    instead, which ``Batch.to`` raises as an ``FPTError``.

    With ``augmentation_seed`` the views of sample i in epoch ``epoch`` are drawn from a generator seeded by
    (augmentation_seed, epoch, i): the same whichever process or DataLoader worker builds them, so a run is the
    same with any number of workers or ranks.
    """

    def __init__(
        self,
        root: Path,
        samples: Sequence[Sample],
        side_view: ImageTransform | None = None,
        lpm_view: ImageTransform | None = None,
        cache: FeatureSource | None = None,
        decoded: Mapping[str, Tensor] | None = None,
        augmentation_seed: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.side_view = side_view
        self.lpm_view = lpm_view
        self.cache = cache
        self.decoded = decoded or {}
        self.augmentation_seed = augmentation_seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor | int | str]:
        sample = self.samples[index]
        item: dict[str, Tensor | int | str] = {"index": index, "label": sample.label}
        try:
            if self.side_view is not None or self.lpm_view is not None:
                pixels = self.decoded.get(sample.path)
                image = load_pixels(self.root / sample.path) if pixels is None else pixels.permute(2, 0, 1)
                with torch.random.fork_rng(devices=[], enabled=self.augmentation_seed is not None):
                    if self.augmentation_seed is not None:  # the CPU generator only: the GPUs' drive dropout
                        torch.default_generator.manual_seed(derived_seed(self.augmentation_seed, self.epoch, index))
                    if self.side_view is not None:
                        item["side"] = self.side_view(image)
                    if self.lpm_view is not None:
                        item["lpm"] = self.lpm_view(image)
            if self.cache is not None:
                item.update(self.cache.get(sample.path))
        except FPTError as error:
            return {"index": index, "error": str(error)}
        return item


def decode_in_memory(root: Path, samples: Sequence[Sample], budget_bytes: int) -> dict[str, Tensor] | None:
    """Every image of ``samples`` decoded once, on threads, into shared memory (8-bit RGB [H, W, 3] uint8), for
    the DataLoader workers of every epoch to read instead of decoding the files again; the views made from them
    are the same. None when they would take more than ``budget_bytes``, or one is not an 8-bit image or cannot
    be read (each is then decoded in every epoch, and a bad file reported there as without this)."""

    def pixel_bytes(sample: Sample) -> int:
        return pixel_count(root / sample.path) * 3

    def decode(sample: Sample) -> Tensor | None:
        pixels = decode_rgb8(root / sample.path)
        return None if pixels is None else torch.from_numpy(pixels).share_memory_()

    try:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
            if not samples or sum(pool.map(pixel_bytes, samples)) > budget_bytes:
                return None
            decoded = dict(zip((sample.path for sample in samples), pool.map(decode, samples), strict=True))
    except (FPTError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return None if any(pixels is None for pixels in decoded.values()) else decoded


def dataset_normalization(paths: Sequence[str], size: int = 224, num_workers: int | None = 0) -> Normalization:
    """Per-channel mean and std of the images at ``paths`` (resized to ``size``), for ``--norm auto``; the workers
    as ``worker_count`` gives them (None: one per spare core)."""
    samples = [Sample(str(path), 0) for path in paths]
    views = SampleViews(Path(), samples, lpm_view=T.Compose([pixels_to_float, T.Resize((size, size), antialias=True)]))
    workers = worker_count(num_workers, math.ceil(len(samples) / 32))
    loader = DataLoader(views, batch_size=32, num_workers=workers, collate_fn=collate)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for batch in progress_bar(loader, desc="normalisation statistics", unit="batch", leave=False):
        images = batch.to("cpu").lpm.double()
        total += images.sum(dim=(0, 2, 3))
        squares += images.pow(2).sum(dim=(0, 2, 3))
        count += images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


def worker_count(requested: int | None, batches: int | None = None) -> int:
    """DataLoader workers: as requested, else one per spare core (at most 4; 0 on a single core); with the number
    of ``batches`` to load, at most ``batches - 1``: a worker only helps by loading one batch while another is used,
    and a lone batch is loaded fastest by the process itself (no fork, no copy through shared memory)."""
    count = requested if requested is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    return count if batches is None else min(count, max(0, batches - 1))
