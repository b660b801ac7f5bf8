"""Training batches shared among ranks, and augmentation seeded per sample: what makes a run the same with any
number of processes or DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fpt.config import Augmentation
from fpt.data.datasets import Sample
from fpt.data.loaders import GlobalBatchSampler, SampleViews, collate, start_epoch
from fpt.data.transforms import Normalization, side_view
from fpt.distributed import Ranks
from fpt.errors import FPTError


@pytest.mark.parametrize(("count", "batch_size"), [(12, 5), (16, 4), (7, 7), (10, 3)])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_ranks_shares_make_up_the_batches_of_one_process(count: int, batch_size: int, world_size: int) -> None:
    def batches(ranks: Ranks, epoch: int) -> list[list[int]]:
        sampler = GlobalBatchSampler(count, batch_size, seed=4, ranks=ranks)
        sampler.set_epoch(epoch)
        return list(sampler)

    for epoch in (0, 1):
        single = batches(Ranks(), epoch)
        shares = [batches(Ranks(rank, world_size), epoch) for rank in range(world_size)]
        assert all(len(share) == len(single) == -(-count // batch_size) for share in shares)
        for step, batch in enumerate(single):
            assert [index for share in shares for index in share[step]] == batch  # in rank order, none repeated
            sizes = [len(share[step]) for share in shares]
            assert max(sizes) - min(sizes) <= 1
        assert sorted(index for batch in single for index in batch) == list(range(count))
    assert batches(Ranks(), 0) != batches(Ranks(), 1)  # a new order each epoch


def test_a_batch_smaller_than_the_job_is_refused_naming_the_fix() -> None:
    with pytest.raises(FPTError, match="pass --batch-size 3 or more, or start fewer processes"):
        GlobalBatchSampler(count=100, batch_size=2, seed=0, ranks=Ranks(0, 3))
    with pytest.raises(FPTError, match="the training split has 2 images"):
        GlobalBatchSampler(count=2, batch_size=16, seed=0, ranks=Ranks(0, 3))


@pytest.mark.parametrize("count", [0, 1, 5, 6])
def test_a_split_is_shared_in_contiguous_unpadded_parts(count: int) -> None:
    for world_size in (1, 2, 4):
        parts = [Ranks(rank, world_size).share(count) for rank in range(world_size)]
        assert [index for part in parts for index in part] == list(range(count))


def test_augmented_views_depend_on_the_sample_and_epoch_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{index}.png")
        samples.append(Sample(f"{index}.png", index % 2))
    view = side_view(16, Normalization((0.5,) * 3, (0.25,) * 3), Augmentation())

    def views(workers: int, world_size: int, epoch: int) -> dict[int, torch.Tensor]:
        found = {}
        for rank in range(world_size):
            dataset = SampleViews(tmp_path, samples, side_view=view, augmentation_seed=3)
            sampler = GlobalBatchSampler(len(samples), 4, seed=3, ranks=Ranks(rank, world_size))
            loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate)
            start_epoch(loader, epoch)
            torch.manual_seed(rank)  # the global generator plays no part
            for batch in loader:
                if len(batch):  # rank 2's share of the last batch (2 images) is empty
                    found.update(zip(batch.index.tolist(), batch.side, strict=True))
        return found

    reference = views(workers=0, world_size=1, epoch=0)
    for workers, world_size in [(2, 1), (0, 2), (1, 3)]:
        other = views(workers, world_size, epoch=0)
        assert all(torch.equal(other[index], view) for index, view in reference.items())
    next_epoch = views(workers=0, world_size=1, epoch=1)
    assert not any(torch.equal(next_epoch[index], view) for index, view in reference.items())
