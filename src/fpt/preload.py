"""Preloading (``fpt preload``): run the frozen LPM once over a dataset and store what the method reads of it:
the selected keys/values (FPT, FPT+) or a pooled embedding (the linear probe).

The LPM is frozen and its input never augmented, so each image's features are the same in every epoch:
computed once here, they are read from ``fpt.cache`` during training, which then never runs the LPM. The
cache's fingerprint records everything that determines them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fpt import distributed
from fpt._version import __version__
from fpt.cache import CacheWriter, FeatureCache, RecordLayout, content_digests
from fpt.config import BackboneSpec, Precision, TrainingConfig, cacheable_methods
from fpt.data.datasets import ImageDataset, Sample
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
        if tensor.numel():  # the tensor's own buffer, not a copy of it
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_fingerprint(
    backbone: BackboneSpec,
    weights_sha256: str,
    feature_settings: dict[str, Any],
    normalization: Normalization,
    dtype: str,
    precision: Precision,
    compression: str = "none",
) -> dict[str, Any]:
    """Everything that determines the cached features of an image (``feature_settings``: the method's own, from
    ``TransferModel.feature_settings``), and how they are stored: a cache holds records of one dtype and one
    compression (recorded only when there is one, so that the fingerprints of uncompressed caches stay as they
    were)."""
    return {
        "backbone": backbone.to_dict(),
        "weights_sha256": weights_sha256,
        **feature_settings,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
        "dtype": dtype,
        **({} if compression == "none" else {"compression": compression}),
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
    return preload_together([(model, training)], dataset, normalization, overwrite, progress)[0]


def preload_together(
    targets: Sequence[tuple[TransferModel, TrainingConfig]],
    dataset: ImageDataset,
    normalization: Normalization,
    overwrite: bool = False,
    progress: bool = True,
) -> list[PreloadSummary]:
    """Fill several methods' caches (each ``training.cache_dir``, in its cache dtype) from one pass of the LPM.

    Only the first model needs its LPM; it runs, on the first training's batch size, workers, device and
    precision, and every model records its own features from that forward (``recording_features``). All must
    read the same backbone at the same LPM input size. Each cache gets exactly what ``preload`` would write.

    Under torchrun every rank calls this: the images are hashed on all ranks, the missing ones split among them
    (each on exactly one rank), each rank writes its own shards and index fragment, and rank 0 (which holds each
    cache's lock throughout) merges the fragments when all are done. A rerun, with any number of ranks,
    completes the cache an interrupted job left.
    """
    driver, first = targets[0]
    for model, training in targets:
        if not model.config.cacheable:
            raise FPTError(
                f"{model.config.method} has no LPM features to preload; only {cacheable_methods()} train from a cache"
            )
        if training.cache_dir is None:
            raise FPTError("preloading needs a cache directory (TrainingConfig.cache_dir, --cache DIR)")
        if (model.config.backbone, model.config.lpm_input_size) != (
            driver.config.backbone,
            driver.config.lpm_input_size,
        ):
            raise FPTError(
                f"{model.config.method} and {driver.config.method} read different LPMs or LPM input sizes; "
                "preload them one at a time"
            )
    start = time.perf_counter()
    lpm = driver.frozen_lpm()  # raises for a model built without its LPM
    ranks = distributed.ranks(first.device)
    progress = progress and ranks.is_main  # one bar: rank 0's share
    target = select_device(ranks.device_name(first.device))
    effective_precision = first.precision if target.type == "cuda" else "fp32"  # autocast only runs on GPUs
    digest = weights_digest(lpm)
    settings = [
        (
            Path(training.cache_dir),
            cache_fingerprint(
                model.config.backbone,
                digest,
                model.feature_settings(),
                normalization,
                training.cache_dtype,
                effective_precision,
                training.cache_compression,
            ),
            RecordLayout(model.feature_layout(), training.cache_dtype, training.cache_compression),
        )
        for model, training in targets
    ]
    wait = not ranks.distributed  # a job's other ranks would time out in a barrier while rank 0 waited for a lock
    created = ranks.on_main(  # each cache is created (or emptied, with overwrite) once, before the others open it
        lambda: [
            FeatureCache.create(path, fingerprint, layout, overwrite, wait) for path, fingerprint, layout in settings
        ]
    )
    caches = created or [FeatureCache.open(path, fingerprint) for path, fingerprint, _ in settings]
    samples = {sample.path: sample for split in dataset.splits.values() for sample in split}
    keys = list(samples)
    hashed = ranks.each(lambda: content_digests(dataset.root, keys[ranks.rank :: ranks.world_size], progress))
    digests = {key: digest for part in hashed for key, digest in part.items()}
    with ExitStack() as locks:  # rank 0's writers hold the caches' locks for the whole job

        def lock_and_list_missing() -> tuple[list[CacheWriter], list[list[str]]]:
            """The lock-holding writers of the incomplete caches (which merge what an interrupted job left), and
            what each cache lacks; a complete cache is never locked."""
            incomplete = sorted((cache for cache in caches if cache.missing(digests)), key=_lock_order)
            owned = [locks.enter_context(cache.writer(wait=wait)) for cache in incomplete]
            return owned, [cache.missing(digests) if cache in incomplete else [] for cache in caches]

        owners, missing_keys = ranks.on_main(lock_and_list_missing) or ([], None)
        missing_per_cache = [set(wanted) for wanted in ranks.broadcast(missing_keys)]  # rank 0's view, on every rank
        missing = [samples[key] for key in samples if any(key in wanted for wanted in missing_per_cache)]
        share = missing[ranks.rank :: ranks.world_size]  # fixed and never padded: each image on one rank

        def compute_share() -> None:
            with ExitStack() as fragments:
                writers = {id(owner.cache): owner for owner in owners}  # rank 0 writes the index itself
                if not ranks.is_main:
                    needed = [cache for cache, wanted in zip(caches, missing_per_cache, strict=True) if wanted]
                    writers = {id(cache): fragments.enter_context(cache.writer(ranks.rank)) for cache in needed}
                _compute(
                    targets,
                    lpm,
                    dataset.root,
                    share,
                    digests,
                    caches,
                    missing_per_cache,
                    writers,
                    target,
                    normalization,
                    progress,
                )

        ranks.each(compute_share)  # every rank's fragments are complete and closed

        def merge_and_check() -> None:
            for owner in owners:
                owner.merge_fragments(range(1, ranks.world_size))
                unfinished = owner.cache.missing(digests)
                if unfinished:
                    raise FPTError(
                        f"{len(unfinished)} images are missing from {owner.cache.directory} after merging every "
                        f"rank's records ({unfinished[0]}, ...); run the preload again to compute them"
                    )

        ranks.on_main(merge_and_check)  # no rank goes on before rank 0 has merged and checked every cache
    seconds = time.perf_counter() - start
    return [
        PreloadSummary(
            cache_dir=Path(training.cache_dir),
            computed=len(wanted),
            reused=len(samples) - len(wanted),
            bytes_on_disk=cache.size_on_disk(),
            seconds=seconds,
        )
        for (_, training), cache, wanted in zip(targets, caches, missing_per_cache, strict=True)
    ]


def _compute(
    targets: Sequence[tuple[TransferModel, TrainingConfig]],
    lpm: nn.Module,
    root: Path,
    share: Sequence[Sample],
    digests: dict[str, str],
    caches: Sequence[FeatureCache],
    missing_per_cache: Sequence[set[str]],
    writers: dict[int, CacheWriter],
    target: torch.device,
    normalization: Normalization,
    progress: bool,
) -> None:
    """Run the LPM over ``share`` (this rank's part of the missing images) and write to each cache, through its
    writer in ``writers`` (keyed by ``id(cache)``), the features of the images it lacks."""
    driver, first = targets[0]
    lpm.to(target)
    views = SampleViews(root, share, lpm_view=lpm_view(driver.config.lpm_input_size, normalization))
    loader = DataLoader(
        views,
        batch_size=first.batch_size,
        num_workers=worker_count(first.num_workers, math.ceil(len(share) / first.batch_size)),
        collate_fn=collate,
        pin_memory=target.type == "cuda",
    )
    bar = progress_bar(total=len(share), unit="img", desc="preload", enabled=progress and bool(share))
    # on a GPU the writes overlap the next batch; on the CPU they would only take cores from the LPM (measured: 8 %
    # slower with ViT-S at 512 px on 2 cores)
    with bar, InOrderWrites(background=target.type != "cpu") as writes:
        for batch in loader:
            images = batch.to(target).lpm
            with autocast(target, first.precision):
                features = _features_of_each(targets, lpm, images)
            paths = [share[i].path for i in batch.index.tolist()]
            for cache, wanted, parts in zip(caches, missing_per_cache, features, strict=True):
                rows = [row for row, path in enumerate(paths) if path in wanted]
                if rows:
                    chosen = [paths[row] for row in rows]
                    parts = {name: part[rows] for name, part in parts.items()}
                    writes.submit(writers[id(cache)].add, chosen, parts, [digests[path] for path in chosen])
            bar.update(len(paths))


class InOrderWrites:
    """Cache writes in the order they are submitted; with ``background``, on one background thread, so that an
    accelerator computes the next batch while the last one is encoded, checksummed, written and synced (all of
    which release the GIL); else each in the caller, at once.

    At most ``depth`` writes wait at a time (each holds its batch of features). The first write that fails stops
    the ones queued after it, and its error is raised in the caller at its next submission or when the block
    ends. Leaving the block waits for the writes already submitted, also when the caller is interrupted, so that
    every computed batch is kept.
    """

    def __init__(self, background: bool = True, depth: int = 2) -> None:
        self.background = background
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fpt-cache-write")
        self.pending: deque[Future[None]] = deque()
        self.failed = False

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        if not self.background:
            write(*args)
            return
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._unless_failed, write, *args))

    def _unless_failed(self, write: Callable[..., None], *args: Any) -> None:
        if self.failed:
            return
        try:
            write(*args)
        except BaseException:
            self.failed = True
            raise

    def __enter__(self) -> InOrderWrites:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.pool.shutdown(wait=True)
        if kind is None:
            for future in self.pending:
                future.result()


def _lock_order(cache: FeatureCache) -> str:
    """Locks are always taken in the order of their directories, so two shared preloads never deadlock."""
    return str(cache.directory.resolve())


def _features_of_each(
    targets: Sequence[tuple[TransferModel, TrainingConfig]], lpm: nn.Module, images: Tensor
) -> list[dict[str, Tensor]]:
    """Each target's features of ``images`` [B, C, S, S]: one model's own ``preload_features``, or for several,
    one full forward of ``lpm`` that all of them record."""
    if len(targets) == 1:
        return [targets[0][0].preload_features(images)]
    with ExitStack() as stack, torch.no_grad():
        readers = [stack.enter_context(model.recording_features(lpm)) for model, _ in targets]
        lpm.forward_features(images)
        return [read() for read in readers]
