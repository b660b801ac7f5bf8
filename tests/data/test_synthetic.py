"""The synthetic fundus benchmark: deterministic, graded by lesion counts, lesions invisible at 128 px."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fpt.config import SynthTask
from fpt.data.datasets import load_dataset
from fpt.data.synthetic import (
    GRADE_NAMES,
    GRADES,
    LesionCounts,
    random_background,
    scaled_counts,
    synthesize,
    write_dataset,
)
from fpt.errors import FPTError


def side_view(image: torch.Tensor) -> torch.Tensor:
    """The FPT+ side network's view: 128 px, bilinear, antialiased."""
    return F.interpolate(image[None], size=(128, 128), mode="bilinear", antialias=True)[0]


def test_same_seed_gives_the_same_image_and_different_seeds_different_backgrounds() -> None:
    first, again, other = synthesize(11, 2), synthesize(11, 2), synthesize(12, 2)
    assert torch.equal(first.image, again.image)
    assert first.lesions == again.lesions
    assert (first.background - other.background).abs().mean() > 0.02


@pytest.mark.parametrize("grade", range(len(GRADES)))
def test_lesion_counts_and_kinds_follow_the_grade(grade: int) -> None:
    counts = GRADES[grade]
    for seed in range(3):
        lesions = synthesize(100 + seed, grade).lesions
        for kind, (low, high) in (
            ("microaneurysm", counts.microaneurysms),
            ("exudate", counts.exudates),
            ("blot", counts.blots),
        ):
            assert low <= sum(lesion.kind == kind for lesion in lesions) <= high


def test_lesions_lie_inside_the_fundus_disc() -> None:
    sample = synthesize(5, 3)
    _, mask = random_background(512, np.random.default_rng(5))
    assert sample.lesions
    assert all(mask[int(lesion.y), int(lesion.x)] == 1 for lesion in sample.lesions)


def test_lesions_change_the_high_resolution_image() -> None:
    sample = synthesize(7, 3)
    changed = (sample.image - sample.background).abs().amax(dim=0) > 0.05
    assert changed.sum() > 100  # 30-odd lesions of a few pixels each


@pytest.mark.parametrize("grade", [1, 2, 3])
def test_the_128_px_side_views_of_graded_and_lesion_free_images_are_nearly_identical(grade: int) -> None:
    for seed in range(4):
        sample = synthesize(200 + seed, grade)
        difference = side_view(sample.image) - side_view(sample.background)
        psnr = 10 * torch.log10(1 / difference.pow(2).mean())
        assert psnr > 35, f"seed {200 + seed}: PSNR {psnr:.1f} dB"  # above ~35 dB differences are hard to see
        assert difference.abs().mean() < 0.002
        assert (difference.abs().amax(dim=0) > 0.05).float().mean() < 0.01  # < 1 % of side pixels move visibly


def test_grade_zero_has_no_lesions() -> None:
    sample = synthesize(3, 0)
    assert sample.lesions == []
    assert torch.equal(sample.image, sample.background)


def test_write_dataset_writes_the_folder_layout_and_a_manifest(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "data", {"train": 8, "val": 4, "test": 4}, first_seed=40, size=64, progress=False)

    with (root / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    seeds = [int(Path(row["path"]).stem) for row in rows]
    assert seeds == list(range(40, 56))  # every split has its own seeds
    folders = load_dataset(root)
    manifest = load_dataset(root / "labels.csv")
    assert folders.classes == manifest.classes == list(GRADE_NAMES)
    for split in ("train", "val", "test"):
        assert sorted(s.path for s in folders.splits[split]) == sorted(s.path for s in manifest.splits[split])
        assert all(count >= 1 for count in folders.class_counts(split))


def test_a_binary_imbalanced_jpeg_task_has_the_asked_classes_ratio_and_format(tmp_path: Path) -> None:
    task = SynthTask(grades=(0, 1), class_ratio=(3, 1), image_format="jpg")
    write_dataset(tmp_path, {"train": 8, "test": 4}, size=64, progress=False, task=task)

    with (tmp_path / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == (["0_none"] * 3 + ["1_mild"]) * 3
    assert all(row["path"].endswith(".jpg") for row in rows)
    assert load_dataset(tmp_path / "labels.csv").classes == ["0_none", "1_mild"]
    assert [len(list((tmp_path / "train" / grade).iterdir())) for grade in ("0_none", "1_mild")] == [6, 2]


def test_fewer_and_smaller_lesions_scale_the_demos_counts_and_radii() -> None:
    demo, fewer = synthesize(300, 3), synthesize(300, 3, lesion_scale=0.5, lesion_count=0.5)
    counts = scaled_counts(GRADES[3], 0.5)
    assert counts == LesionCounts(microaneurysms=(10, 13), exudates=(2, 2), blots=(1, 2))
    assert scaled_counts(GRADES[1], 0.1).microaneurysms == (1, 1)  # a lesion-bearing grade keeps one
    assert len(fewer.lesions) < len(demo.lesions)
    for kind, (low, high) in (("microaneurysm", counts.microaneurysms), ("blot", counts.blots)):
        assert low <= sum(lesion.kind == kind for lesion in fewer.lesions) <= high
    assert max(lesion.radius for lesion in fewer.lesions) <= 2.0  # half of the largest blot radius, 4 px


def test_the_default_task_is_the_demos(tmp_path: Path) -> None:
    write_dataset(tmp_path / "default", {"train": 4}, size=64, progress=False)
    write_dataset(tmp_path / "explicit", {"train": 4}, size=64, progress=False, task=SynthTask())
    for name in ("000000.png", "000003.png"):
        grade = GRADE_NAMES[int(name[5])]
        assert (tmp_path / "default" / "train" / grade / name).read_bytes() == (
            tmp_path / "explicit" / "train" / grade / name
        ).read_bytes()
    assert torch.equal(synthesize(9, 2).image, synthesize(9, 2, lesion_scale=1.0, lesion_count=1.0).image)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grades": (1,)}, "two or more distinct grades"),
        ({"grades": (0, 4)}, "two or more distinct grades"),
        ({"class_ratio": (1, 2)}, "one positive whole number per grade"),
        ({"lesion_scale": 0}, "must be positive"),
        ({"image_format": "bmp"}, "image format must be one of png, jpg"),
    ],
)
def test_impossible_tasks_are_refused(options: dict, message: str) -> None:
    with pytest.raises(FPTError, match=message):
        SynthTask(**options)
